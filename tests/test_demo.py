import re

from flwr_select.selection.demo import main


def test_demo_on_real_mnist_sends_what_the_paper_predicts(mnist_dir, capsys):
    # Execute: one site, one round, rho = 0.05 of a 5,000-sample fold
    main(["--data-dir", str(mnist_dir), "--rho", "0.05"])
    out = capsys.readouterr().out
    # Assert
    wrong_on_site = int(re.search(r"(\d+) wrong; budget 250 samples", out).group(1))
    rows = {
        m["policy"]: (
            int(m["n"]),
            int(m["wrong"]),
            float(m["ce"]),
            int(m["bytes"]),
            int(m["packed"]),
        )
        for m in re.finditer(
            r"(?P<policy>\w+): (?P<n>\d+) samples, (?P<wrong>\d+) wrong, mean cross-entropy "
            r"(?P<ce>[\d.]+), (?P<bytes>\d+) bytes \((?P<packed>\d+) compressed\)",
            out,
        )
    }
    assert set(rows) == {"uniform", "oblivious", "proxy"}
    assert all(n == 250 for n, *_ in rows.values())
    # a briefly trained LeNet-5 gets well over 250 of 5,000 wrong, so both
    # correctness-aware schemes send only wrong samples; uniform sends few
    assert wrong_on_site > 250
    assert rows["oblivious"][1] == rows["proxy"][1] == 250
    assert rows["uniform"][1] < 125
    # among wrong samples, the proxy picks the least confident (highest loss)
    assert rows["proxy"][2] > rows["oblivious"][2] > rows["uniform"][2]
    for n, _, _, raw, packed in rows.values():
        assert 785 * n < raw <= 1.02 * 785 * n and packed < 0.4 * raw
