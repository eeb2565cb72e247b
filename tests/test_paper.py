"""The paper's experiments in short mode on a slice of real MNIST."""

import json

import numpy as np
import pytest

from flwr_select.files import read_json_lines
from simulations.experiments import Data
from simulations.measures import allocation_gains, bandwidth_equivalence, rounds_to
from simulations.paper import (
    EXPERIMENTS,
    SHORT,
    SHORT_RHOS,
    Scheme,
    _trained_initial_state,
    run_experiment,
    run_site,
)

SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def data(mnist_dir):
    return Data("mnist", mnist_dir)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("paper")


def runs_of(out, dataset="mnist"):
    return {
        p.name: read_json_lines(p)
        for p in (out / "runs-short").glob(f"{dataset}-*.jsonl")
    }


@pytest.mark.parametrize("name", ["fig2", "fig3", "fig4a", "noise"])
def test_each_experiment_writes_complete_consistent_records_and_a_figure(
    data, out, name
):
    # Execute
    summary = run_experiment(name, data, SHORT, out, seeds=[0])
    # Assert: one line per scheme, every run complete and consistent
    spec = EXPERIMENTS[name]
    assert {line["scheme"] for line in summary["lines"].values()} == {
        s.label for s in spec["schemes"]
    }
    assert (out / name / f"{name}-mnist.png").stat().st_size > 10_000
    for run in runs_of(out).values():
        assert [r["round"] for r in run] == list(range(SHORT.rounds + 1))
        rho = run[0]["rho"]
        for r in run[1:]:
            # the budget: floor(rho * fold), all of it unless a group runs short
            assert r["samples"] <= int(rho * SHORT.fold + 1e-9)
            if run[0]["policy"] != "group":
                assert r["samples"] == int(rho * SHORT.fold + 1e-9)
            # every uploaded sample costs at least its pixels and label on the wire
            assert r["bytes"] >= 785 * r["samples"]
            assert r["wrong_sent"] <= r["samples"] and r["noisy_sent"] <= r["samples"]
        assert run[-1]["samples_total"] == sum(r["samples"] for r in run)
        assert run[-1]["bytes_total"] == sum(r["bytes"] for r in run)
        assert run[-1]["buffer_size"] == SHORT.initial + run[-1]["samples_total"]


def test_label_noise_is_flipped_and_counted(data, out):
    run_experiment("noise", data, SHORT, out, seeds=[0])
    noisy = [r for name, r in runs_of(out).items() if "noise" in name]
    assert len(noisy) == len(EXPERIMENTS["noise"]["schemes"]) == 5
    # 5 % of the 3,000 pool samples are flipped; a uniform site sends about 5 % of its picks
    uniform = next(r for r in noisy if r[0]["scheme"] == "uniform")
    assert (
        0 <= sum(r["noisy_sent"] for r in uniform) <= 0.2 * uniform[-1]["samples_total"]
    )
    # the proxy favours wrong predictions, and flipped labels are mostly predicted "wrong"
    proxy = next(r for r in noisy if r[0]["scheme"] == "proxy")
    assert sum(r["noisy_sent"] for r in proxy) >= sum(r["noisy_sent"] for r in uniform)
    # the trimmed proxy leaves the likely flipped (the model all but sure of another
    # class) for last
    # class) for last, and so does the trimmed lowest-confidence policy
    for robust in ("trimmed-proxy", "trimmed-lowest-confidence"):
        run = next(r for r in noisy if r[0]["scheme"] == robust)
        assert sum(r["noisy_sent"] for r in run) < sum(r["noisy_sent"] for r in proxy)


def test_fig4b_measures_bandwidth_equivalence(data, out):
    summary = run_experiment("fig4b", data, SHORT, out, seeds=[0], rhos=SHORT_RHOS)
    assert sorted({line["rho"] for line in summary["lines"].values()}) == SHORT_RHOS
    eq = summary["bandwidth_equivalence"]
    assert eq["proxy_rho"] == SHORT_RHOS[0]
    if eq["uniform_rho"] is not None:
        assert eq["uniform_final_accuracy"] >= eq["proxy_final_accuracy"]
        assert eq["bytes_ratio"] == pytest.approx(eq["samples_ratio"], rel=0.05)
    assert (
        summary["fedavg_bytes"] > 4 * 61_706 * SHORT.rounds
    )  # float32 weights per round


def test_proxy_is_no_worse_than_uniform_at_rho_005_over_seeds(data, out):
    # The paper's ordering at rho = 0.05 (Fig. 4a), on a small slice and 4 seeds: the
    # proxy's mean final accuracy is not below uniform's by more than one point.
    summary = run_experiment("fig4a", data, SHORT, out, seeds=SEEDS)
    final = {
        line["scheme"]: line["accuracy_mean"][-1] for line in summary["lines"].values()
    }
    assert final["proxy"] >= final["uniform"] - 0.01
    # and it sends far more of the samples the model gets wrong
    wrong = {
        line["scheme"]: line["wrong_sent"][0] for line in summary["lines"].values()
    }
    assert wrong["proxy"] > 2 * wrong["uniform"]


def test_a_subset_of_schemes_runs_and_summarises_only_those(data, out):
    # seed 0 of fig4a is on disk from the first test: nothing runs, one line remains
    before = set(runs_of(out))
    summary = run_experiment("fig4a", data, SHORT, out, seeds=[0], schemes=["proxy"])
    assert {line["scheme"] for line in summary["lines"].values()} == {"proxy"}
    assert set(runs_of(out)) == before


def test_rounds_to_target_and_equivalence_arithmetic():
    assert rounds_to([0.97, 0.985, 0.99, 0.991], 0.989) == 2
    assert rounds_to([0.97, 0.98], 0.989) is None
    lines = {
        "proxy@0.01": {
            "scheme": "proxy",
            "rho": 0.01,
            "accuracy_mean": [0.9, 0.95],
            "samples_total": [100, 0],
            "bytes_total": [1000, 0],
        },
        "uniform@0.01": {
            "scheme": "uniform",
            "rho": 0.01,
            "accuracy_mean": [0.9, 0.92],
            "samples_total": [100, 0],
            "bytes_total": [1000, 0],
        },
        "uniform@0.15": {
            "scheme": "uniform",
            "rho": 0.15,
            "accuracy_mean": [0.9, 0.951],
            "samples_total": [1500, 0],
            "bytes_total": [15100, 0],
        },
    }
    eq = bandwidth_equivalence(lines, 0.01)
    assert (eq["uniform_rho"], eq["samples_ratio"], eq["bytes_ratio"]) == (
        0.15,
        15.0,
        15.1,
    )
    assert np.isclose(eq["proxy_final_accuracy"], 0.95)


def test_allocation_gain_is_counted_against_the_same_policy_per_site():
    def line(scheme, accuracy, spent, rho=0.05):
        return {
            "scheme": scheme,
            "rho": rho,
            "accuracy_mean": accuracy,
            "bytes_mean": spent,
        }

    lines = {
        "proxy@0.05": line("proxy", [0.9, 0.95, 0.97], [0, 100, 200]),
        "proxy-global@0.05": line("proxy-global", [0.9, 0.97, 0.975], [0, 100, 200]),
        "uniform@0.05": line("uniform", [0.9, 0.98, 0.99], [0, 100, 200]),
        "uniform-global@0.05": line("uniform-global", [0.9, 0.91, 0.92], [0, 100, 200]),
        # a global line without its per-site partner is left out
        "proxy-global@0.1": line("proxy-global", [0.9, 0.99], [0, 400], rho=0.1),
    }
    gains = {g["global"]: g for g in allocation_gains(lines)}
    assert set(gains) == {"proxy-global", "uniform-global"}
    proxy = gains["proxy-global"]
    assert proxy["per_site"] == "proxy" and np.isclose(proxy["accuracy_gain"], 0.005)
    # per-site's final 0.97 is reached at round 1, after half the bytes
    assert (proxy["bytes_to_per_site_final"], proxy["bytes_ratio"]) == (100, 0.5)
    uniform = gains["uniform-global"]
    assert np.isclose(uniform["accuracy_gain"], -0.07)
    assert uniform["bytes_to_per_site_final"] is None and uniform["bytes_ratio"] is None


def test_n_dirichlet_sites_share_one_budget_through_the_flower_simulation(
    mnist_dir, out
):
    from simulations.sites import run_sites

    # Execute: 3 virtual SuperNodes, Dirichlet(0.5) shares, short protocol, the
    # proxy with one global budget (what the per-site budgets allow together)
    summary = run_sites(
        "mnist",
        str(mnist_dir),
        out,
        partitioner="dirichlet",
        alpha=0.5,
        num_sites=3,
        seeds=[0],
        protocol=SHORT,
        schemes=[Scheme("proxy", "proxy")],
        allocations=("global",),
    )
    # Assert: the records were converted whole and the figures drawn
    (run,) = [r for name, r in runs_of(out).items() if "dirichlet" in name]
    assert [r["round"] for r in run] == list(range(SHORT.rounds + 1))
    assert run[-1]["samples_total"] == sum(r["samples_received"] for r in run) > 0
    assert run[-1]["allocation"] == "global" and run[-1]["scheme"] == "proxy-global"
    # each round's quotas, by partition id, are what the sites sent
    for record in run[1:]:
        assert sum(record["quota_by_site"].values()) == record["samples_received"]
        assert record["quota_by_site"] == record["samples_by_site"]
        assert set(record["samples_by_site"]) <= {"0", "1", "2"}
    # the budget is the per-site one's: at most 5 % of the pool in all
    assert run[-1]["samples_total"] <= 0.05 * SHORT.fold * SHORT.rounds
    line = summary["lines"]["proxy-global@0.05"]
    assert line["accuracy_mean"][-1] > run[0]["accuracy"]
    folder = out / "sites-dirichlet-allocation"
    assert (folder / "sites-dirichlet-allocation-mnist.png").is_file()
    assert (folder / "sites-dirichlet-allocation-quotas-mnist.png").is_file()


def test_the_report_prints_the_readme_tables(data, out, capsys):
    from simulations.report import main

    run_experiment("fig4a", data, SHORT, out, seeds=[0])
    run_experiment("fig4b", data, SHORT, out, seeds=[0], rhos=SHORT_RHOS)
    main([str(out)])
    printed = capsys.readouterr().out
    assert "**mnist, Fig. 4a: rho = 0.05**" in printed and "**mnist, Fig. 4b" in printed
    for scheme in ("uniform", "oblivious", "proxy"):
        assert f"| {scheme} | " in printed
    assert "| 0.05 | " in printed and "| 0.3 | " in printed
    # Fig. 4b: validation with its spread, then test, a column per scheme each
    assert "| rho | oblivious val. | proxy val. | uniform val. | oblivious test |" in (
        printed
    )


def test_the_report_titles_every_experiment_and_skips_other_summaries(
    data, out, tmp_path, capsys
):
    from simulations.report import main

    # Prepare: one summary under a paper name, one under an N-site name, and
    # a summary of another kind (the purity study's)
    run_experiment("fig4a", data, SHORT, out, seeds=[0])
    summary = json.loads((out / "fig4a" / "summary-mnist.json").read_text())
    setting = {
        "sites": 5,
        "partitioner": "dirichlet",
        "alpha": 0.1,
        "label_noise": 0.3,
        "label_noise_kind": "symmetric",
        "noisy_sites": "0",
        "easy_sites": "",
    }
    for name in ("noise20-asymmetric", "sites-dirichlet-noisy-site-allocation"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary-mnist.json").write_text(
            json.dumps({**summary, "setting": setting})
        )
    (tmp_path / "purity").mkdir()
    (tmp_path / "purity" / "summary-mnist.json").write_text('{"result": {}}')
    # Execute
    main([str(tmp_path)])
    # Assert: the paper's experiment first, with its noise column, then the sites'
    titles = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("**")
    ]
    assert len(titles) == 2
    assert titles[0].startswith("**mnist, 20 % of the sites' labels flipped, each")
    assert titles[1].startswith(
        "**mnist, 5 Dirichlet(0.1) sites through Flower, 30% of the labels at site 0 "
        "flipped**"
    )


def test_the_audit_measure_counts_the_rounds_the_noisy_site_stood_out():
    from simulations.measures import audit

    def run(reported, suspect):  # round 0 first: the initial model, no audit
        rounds = [
            {"reported_noisy": n, "reported_clean_max": c, "suspect_noisy": s}
            for (n, c), s in zip(reported, suspect, strict=True)
        ]
        return [{}, *rounds]

    # the noisy site ties a clean one in round 2 of the first run: not named
    first = run([(30, 2), (5, 5), (9, 1)], [4, 0, 1])
    second = run([(8, 0), (7, 6), (6, 0)], [2, 2, 2])
    measured = audit([first, second])
    assert measured["audit_named"] == [2.5, 0.5]
    assert measured["suspect_uploads"] == [5.5, 0.5]
    assert audit([[{}, {"accuracy": 0.9}]]) == {}  # clean runs hold no audit


def test_the_same_seed_data_and_protocol_give_the_same_records(data):
    # uniform draws at random, so the seeded choices are exercised too
    def one_run():
        return run_site(data, SHORT, Scheme("uniform", "uniform"), 0.05, seed=1)

    first = one_run()
    _trained_initial_state.cache_clear()  # the second run trains its initial model
    again = one_run()
    assert json.dumps(again) == json.dumps(first)  # every value, to the bit
    assert "seconds" not in first[-1]  # timings are kept apart (runs/timings.jsonl)


def test_runs_side_by_side_give_the_same_records_as_one_after_another(data, tmp_path):
    # Execute: two of Fig. 4a's runs in this process, then on two worker processes
    schemes = ["uniform", "proxy"]
    for folder, workers in (("one", 1), ("two", 2)):
        run_experiment(
            "fig4a",
            data,
            SHORT,
            tmp_path / folder,
            [0],
            workers=workers,
            schemes=schemes,
        )
    # Assert: the same files, to the byte
    runs = sorted((tmp_path / "one" / "runs-short").glob("mnist-*.jsonl"))
    assert len(runs) == 2
    for run in runs:
        side_by_side = tmp_path / "two" / "runs-short" / run.name
        assert side_by_side.read_bytes() == run.read_bytes()


def test_the_sites_audit_is_told_apart_by_the_samples_each_node_sent(mnist_dir):
    from flwr_select.partition import SiteShareConfig
    from simulations.sites import audit_by_site, by_site, node_sites

    # Prepare: 3 IID sites, site 1 noisy; nodes 11, 22, 33 hold sites 2, 1, 0
    share = SiteShareConfig(
        data_dir=str(mnist_dir),
        validation_size=1000,
        initial_size=1000,
        pool_size=3000,
        num_server_rounds=3,
        label_noise=0.3,
        label_noise_sites="1",
    )
    labels = Data("mnist", mnist_dir).labels.numpy()
    pools = [
        share.site_pool(labels, seed=0, partition_id=i, num_partitions=3)
        for i in range(3)
    ]
    buffer = {
        "sites": np.array([0, 11, 22, 33, 22]),
        "ids": np.array([7, pools[2][0], pools[1][5], pools[0][9], pools[1][6]]),
    }
    execution = [
        {"round": 0, "suspect_labels_by_node": {}, "suspect_candidates_by_node": {}},
        {
            "round": 1,
            "suspect_labels_by_node": {"11": 2, "22": 40, "33": 5},
            "suspect_candidates_by_node": {"11": 9, "22": 300, "33": 4},
            "samples_received_by_node": {"11": 1, "22": 2, "33": 1, "44": 0},
        },
    ]
    # Execute
    node_site = node_sites(share, 0, 3, buffer)
    # Assert: each node's site; the noisy site's count, and the most of the clean
    # ones; what each site sent (a node that sent nothing is site -1)
    assert node_site == {"11": 2, "22": 1, "33": 0}
    assert by_site(execution, node_site)[0]["samples_by_site"] == {
        "2": 1,
        "1": 2,
        "0": 1,
        "-1": 0,
    }
    assert audit_by_site(share, node_site, execution) == [
        {
            "suspect_noisy": 40,
            "suspect_clean_max": 5,
            "reported_noisy": 300,
            "reported_clean_max": 9,
        }
    ]
