"""The paper's data protocol: held-out, initial and site data, presented in folds.

Section 4 of Jiang et al.: from the training set, 5k samples validate, 5k train
the initial model, and the rest arrive at the sites in folds, one per round. The
server and every site compute the same split from the same seed, so no index
list ever crosses the wire. How the pool is shared among the sites (IID, or
non-IID by label with a Dirichlet prior) is done by Flower Datasets'
partitioners on a small local table of pool entries and labels
(:func:`partition_pool`; ``pip install 'flwr-select[experiments]'``). What a
simulated site or worker is told to find its share is :class:`SiteShareConfig`
or :class:`ShareConfig`: the ServerApp sends it, the node reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flwr_select.config import RunConfigFields, check, check_name
from flwr_select.data import DATASETS
from flwr_select.models import MODELS
from flwr_select.noise import NOISE_KINDS, LabelNoise

PARTITIONERS = ("iid", "dirichlet")
"""Names :func:`partition_pool` accepts (the run-config key ``partitioner``)."""

MAX_SERVER_ROUNDS = 100_000
"""The most rounds ``num-server-rounds`` may ask for.

Far beyond any experiment here (the data-parallel app's default is 300; the
paper's protocol has 10), and well inside the integers that Flower's records
and numpy carry: a mistyped count is refused instead of running for ever or
overflowing an int64 once it is sent.
"""


@dataclass(frozen=True)
class PaperSplit:
    """Positions into a training set, disjoint.

    Attributes
    ----------
    validation : np.ndarray
        Held-out samples the server evaluates on.
    initial : np.ndarray
        Samples the server trains the initial model on.
    pool : np.ndarray
        Samples that arrive at the sites.
    """

    validation: np.ndarray
    initial: np.ndarray
    pool: np.ndarray


def paper_split(
    num_samples: int,
    *,
    seed: int,
    validation: int = 5_000,
    initial: int = 5_000,
    pool: int | None = None,
) -> PaperSplit:
    """Shuffle ``num_samples`` positions with ``seed`` and cut them in three.

    Parameters
    ----------
    num_samples : int
        Size of the training set.
    seed : int
        The run's seed; the same seed gives the same split on every process.
    validation, initial : int (default: 5000 each)
        Sizes of the held-out and initial parts.
    pool : int, optional
        Size of the sites' part (default: everything left), for short runs.

    Examples
    --------
    >>> split = paper_split(20, seed=0, validation=5, initial=5, pool=6)
    >>> [len(split.validation), len(split.initial), len(split.pool)]
    [5, 5, 6]
    """
    available = num_samples - validation - initial
    if validation < 0 or initial < 0 or available < 1:
        raise ValueError(
            f"validation={validation} and initial={initial} leave no samples of "
            f"{num_samples} for the sites"
        )
    if pool is not None and not 1 <= pool <= available:
        raise ValueError(f"pool must be in [1, {available}], got {pool}")
    order = np.random.default_rng(seed).permutation(num_samples)
    end = validation + initial + (available if pool is None else pool)
    return PaperSplit(
        order[:validation],
        order[validation : validation + initial],
        order[validation + initial : end],
    )


@dataclass(frozen=True)
class ShareConfig(RunConfigFields):
    """The run-config keys of the data a simulation's nodes share; checked when built.

    Declared here once: the ServerApps' settings build on it
    (``simulations.runner.ServerConfig``), send its
    :meth:`~flwr_select.config.RunConfigFields.to_config` to every node, and the
    nodes read it back with
    :meth:`~flwr_select.config.RunConfigFields.from_config`, so the two cannot
    disagree. The seed comes with each engine's own config (the selection's or
    the sampling's), and :meth:`split` takes it.

    Parameters
    ----------
    dataset : str (default: "mnist")
        A name from :data:`flwr_select.data.DATASETS`.
    data_dir : str (default: "")
        Its folder; empty: ``$FLWR_SELECT_DATA_DIR``, else the cache.
    model : str (default: "lenet5")
        A name from :data:`flwr_select.models.MODELS`: what the arrays belong to.
    validation_size : int (default: 5000)
        Samples the server holds out; >= 1.
    pool_size : int (default: 0)
        Samples the nodes share; 0: the rest.
    num_server_rounds : int (default: 10)
        Rounds of the run; in [1, :data:`MAX_SERVER_ROUNDS`].
    """

    dataset: str = "mnist"
    data_dir: str = ""
    model: str = "lenet5"
    validation_size: int = 5000
    pool_size: int = 0
    num_server_rounds: int = 10

    def __post_init__(self) -> None:
        rounds = self.num_server_rounds
        check(
            "num-server-rounds",
            rounds,
            1 <= rounds <= MAX_SERVER_ROUNDS,
            f">= 1 and <= {MAX_SERVER_ROUNDS}",
        )
        check_name("dataset", self.dataset, DATASETS)
        check_name("model", self.model, MODELS)
        size = self.validation_size
        check("validation-size", size, size >= 1, ">= 1")
        check("pool-size", self.pool_size, self.pool_size >= 0, ">= 0 (0: the rest)")

    def split(self, num_samples: int, *, seed: int) -> PaperSplit:
        """Return the :func:`paper_split` of the training set these keys describe.

        The server's is the same. A worker's has no initial part: the
        data-parallel server trains no initial model.
        """
        return self._split(num_samples, seed=seed, initial=0)

    def _split(self, num_samples: int, *, seed: int, initial: int) -> PaperSplit:
        return paper_split(
            num_samples,
            seed=seed,
            validation=self.validation_size,
            initial=initial,
            pool=self.pool_size or None,
        )


@dataclass(frozen=True)
class SiteShareConfig(ShareConfig):
    """The run-config keys a simulated site needs to find its fold of the data.

    :class:`ShareConfig`'s, and how the server's initial part and the sites'
    shares are cut (sent, and read back, the same way).

    Parameters
    ----------
    initial_size : int (default: 5000)
        Samples the server trains the initial model on; >= 1.
    partitioner : str (default: "iid")
        A name from :data:`PARTITIONERS` (see :func:`partition_pool`).
    dirichlet_alpha : float (default: 0.5)
        The ``dirichlet`` partitioner's concentration; > 0, whatever the
        partitioner.
    label_noise : float (default: 0.0)
        Share of the pool whose labels are flipped (seeded), in [0, 1); see
        :func:`~flwr_select.noise.flip_labels`. The server's samples stay clean.
    label_noise_kind : str (default: "symmetric")
        A name from :data:`~flwr_select.noise.NOISE_KINDS`.
    label_noise_sites : str (default: "all")
        Which sites hold the flipped labels: ``"all"``, or their partition ids,
        comma-separated (``"0"``, ``"0,3"``); the others hold clean ones. An id
        that no site has is refused where the number of sites is known
        (:meth:`check_sites`).
    easy_sites : str (default: "": none)
        Partition ids of sites that hold only samples of ``easy_classes`` (the
        pool's, split evenly between them), data the initial model already
        classifies right; the other sites share the rest by ``partitioner``.
    easy_classes : str (default: "0,1")
        The classes of the easy sites, comma-separated (MNIST's 0 and 1: the
        digits its models get most right).
    """

    initial_size: int = 5000
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    label_noise: float = 0.0
    label_noise_kind: str = "symmetric"
    label_noise_sites: str = "all"
    easy_sites: str = ""
    easy_classes: str = "0,1"

    def __post_init__(self) -> None:
        super().__post_init__()
        check("initial-size", self.initial_size, self.initial_size >= 1, ">= 1")
        check_partitioner(self.partitioner, self.dirichlet_alpha)
        noise = self.label_noise
        check("label-noise", noise, 0.0 <= noise < 1.0, "in [0, 1)")
        check_name("label-noise-kind", self.label_noise_kind, NOISE_KINDS)
        self.noisy_sites()
        self.easy()

    def site_pool(
        self,
        labels: np.ndarray,
        *,
        seed: int,
        partition_id: int,
        num_partitions: int,
    ) -> np.ndarray:
        """Return the positions site ``partition_id`` of ``num_partitions`` holds.

        Its share of the pool by ``partitioner`` (:func:`partition_pool`), over
        the training set's ``labels`` (clean: the partition never depends on
        the label noise); every round's fold is cut from it.

        Raises
        ------
        ConfigError
            Where ``label-noise-sites`` or ``easy-sites`` names a partition id
            >= ``num_partitions`` (:meth:`check_sites`): every site refuses it
            in the first round, so the run stops instead of going on without
            the noise or the easy sites it asked for.
        """
        self.check_sites(num_partitions, f"num-partitions {num_partitions}")
        pool = self.split(len(labels), seed=seed).pool
        easy, classes = self.easy()
        if easy:  # the easy classes to the easy sites, the rest to the others
            of_easy = np.isin(labels[pool], list(classes))
            if partition_id in easy:
                easy_pool = pool[of_easy]
                return np.array_split(easy_pool, len(easy))[
                    sorted(easy).index(partition_id)
                ]
            others = [p for p in range(num_partitions) if p not in easy]
            pool = pool[~of_easy]
            partition_id, num_partitions = others.index(partition_id), len(others)
        return partition_pool(
            pool,
            labels[pool],
            partition_id,
            num_partitions,
            partitioner=self.partitioner,
            alpha=self.dirichlet_alpha,
            seed=seed,
            # at least one sample per round (and Flower Datasets' default of 10)
            min_partition_size=max(10, self.num_server_rounds),
        )

    def noisy_sites(self) -> frozenset[int] | None:
        """Return the partition ids ``label-noise-sites`` names (None: every site).

        Raises
        ------
        ConfigError
            Unless the value is ``"all"`` or distinct ids >= 0, comma-separated.
        """
        if self.label_noise_sites == "all":
            return None
        return id_list(
            "label-noise-sites",
            self.label_noise_sites,
            '"all" or partition ids >= 0, comma-separated (e.g. "0,3")',
        )

    def check_sites(self, num_sites: int, counted_by: str) -> None:
        """Refuse a site that ``label-noise-sites`` or ``easy-sites`` names but lacks.

        Sites are partition ids ``0 .. num_sites - 1``; a larger id is held by no
        site, and the run would go on without the noise (or the easy sites) it
        asked for, as if it had them. ``counted_by`` says where ``num_sites``
        comes from (``"--num-supernodes 2"``), for the message.

        Raises
        ------
        ConfigError
            Naming the key, the sites there are and where that number comes from.
        """
        named = (
            ("label-noise-sites", self.label_noise_sites, self.noisy_sites()),
            ("easy-sites", self.easy_sites, self.easy()[0]),
        )
        for key, value, ids in named:
            check(
                key,
                value,
                max(ids or (), default=-1) < num_sites,
                f"partition ids in [0, {num_sites}), the sites there are "
                f"({counted_by})",
            )

    def easy(self) -> tuple[frozenset[int], frozenset[int]]:
        """Return the easy sites' partition ids and their classes (no sites: none).

        Raises
        ------
        ConfigError
            Unless ``easy-sites`` is empty or distinct ids >= 0, and
            ``easy-classes`` distinct ids, comma-separated.
        """
        num_classes = DATASETS[self.dataset].num_classes
        classes = id_list(
            "easy-classes",
            self.easy_classes,
            f'classes in [0, {num_classes}), comma-separated (e.g. "0,1")',
        )
        check(
            "easy-classes",
            self.easy_classes,
            max(classes) < num_classes,
            f"classes in [0, {num_classes})",
        )
        if not self.easy_sites:
            return frozenset(), classes
        sites = id_list(
            "easy-sites",
            self.easy_sites,
            '"" (none) or partition ids >= 0, comma-separated (e.g. "0,1")',
        )
        return sites, classes

    def site_labels(
        self, labels: torch.Tensor, *, seed: int, partition_id: int, num_classes: int
    ) -> torch.Tensor:
        """Return the labels site ``partition_id`` holds: with the run's noise, if any.

        The flipped samples are the same for every site and scheme of a seed
        (a share of the pool, :func:`~flwr_select.noise.flip_labels`); a site
        outside ``label-noise-sites`` keeps them clean.
        """
        sites = self.noisy_sites()
        if not self.label_noise or (sites is not None and partition_id not in sites):
            return labels
        noise = LabelNoise(self.label_noise, self.label_noise_kind)
        pool = self.split(len(labels), seed=seed).pool
        return noise.flip(labels, pool, seed, num_classes)[0]

    def split(self, num_samples: int, *, seed: int) -> PaperSplit:
        """Return the :func:`paper_split` of the training set these keys describe.

        The server's is the same: ``initial-size`` samples train its initial
        model, and the sites share the pool.
        """
        return self._split(num_samples, seed=seed, initial=self.initial_size)


def id_list(key: str, value: str, allowed: str) -> frozenset[int]:
    """Return the distinct ints >= 0 of a comma-separated run-config ``value``.

    Raises
    ------
    ConfigError
        Naming ``key`` and what is ``allowed``.
    """
    words = value.split(",")
    ok = all(w.strip().isdigit() for w in words)
    check(key, value, ok, allowed)
    ids = [int(w) for w in words]
    check(key, value, len(set(ids)) == len(ids), allowed + ", each once")
    return frozenset(ids)


def site_partition(
    pool: np.ndarray, partition_id: int, num_partitions: int
) -> np.ndarray:
    """Return site ``partition_id``'s share of the (already shuffled) pool: IID.

    Contiguous near-equal shares (``np.array_split``), the same as
    :func:`partition_pool`'s ``"iid"``, without Flower Datasets.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id must be in [0, {num_partitions}), got {partition_id}"
        )
    return np.array_split(pool, num_partitions)[partition_id]


def check_partitioner(partitioner: str, alpha: float = 0.5) -> None:
    """Raise if ``partitioner`` or ``alpha`` is invalid, or Dirichlet lacks its library.

    ``alpha`` (the run-config key ``dirichlet-alpha``) is checked whatever the
    partitioner, so a mistyped value fails at once. Lets a server refuse a bad
    run config before any site starts.

    Raises
    ------
    flwr_select.config.ConfigError
        If ``partitioner`` is not one of :data:`PARTITIONERS` or ``alpha <= 0``.
    ImportError
        If ``partitioner`` is ``"dirichlet"`` and Flower Datasets is missing.
    """
    check_name("partitioner", partitioner, PARTITIONERS)
    check("dirichlet-alpha", alpha, alpha > 0, "> 0")
    if partitioner == "dirichlet":
        _flwr_datasets_partitioner()


def _flwr_datasets_partitioner() -> Any:
    try:
        import datasets
        from flwr_datasets import partitioner
    except ImportError as err:
        raise ImportError(
            "partitioning the sites' data needs Flower Datasets (flwr-datasets): "
            "pip install 'flwr-select[experiments]'"
        ) from err
    return datasets, partitioner


def partition_pool(
    pool: np.ndarray,
    labels: np.ndarray,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> np.ndarray:
    """Return site ``partition_id``'s share of the pool, split by Flower Datasets.

    A table ``{"idx": pool, "label": labels}`` is partitioned locally (nothing is
    downloaded) and the site's ``idx`` column returned, so every process that
    calls this with the same arguments gets the same share.

    Parameters
    ----------
    pool : np.ndarray
        The sites' samples (positions in the training set), already shuffled.
    labels : np.ndarray
        Their labels, aligned with ``pool``.
    partition_id, num_partitions : int
        Which site of how many.
    partitioner : {"iid", "dirichlet"} (default: "iid")
        ``"iid"``: contiguous near-equal shares of the pool, :func:`site_partition`
        (exactly what Flower Datasets' ``IidPartitioner`` gives, without needing
        it installed; a test checks the two agree).
        ``"dirichlet"``: ``DirichletPartitioner`` by label, non-IID: each class
        is divided among the sites by proportions drawn from Dirichlet(``alpha``);
        small ``alpha`` gives few classes per site, large ``alpha`` near-IID.
    alpha : float (default: 0.5)
        The Dirichlet concentration (``"dirichlet"`` only).
    seed : int (default: 0)
        Seeds the Dirichlet draws and the shuffle of each share.
    min_partition_size : int (default: 10)
        ``"dirichlet"``: draws are repeated (up to 10 times, then ValueError)
        until every site has at least this many samples.

    Returns
    -------
    np.ndarray
        Entries of ``pool``, each in exactly one site's share.
    """
    check_partitioner(partitioner, alpha)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id must be in [0, {num_partitions}), got {partition_id}"
        )
    pool, labels = np.asarray(pool), np.asarray(labels)
    if pool.shape != labels.shape:
        raise ValueError(
            f"pool and labels must align, got {pool.shape} and {labels.shape}"
        )
    if partitioner == "iid":
        return site_partition(pool, partition_id, num_partitions)
    datasets, partitioners = _flwr_datasets_partitioner()
    chosen = partitioners.DirichletPartitioner(
        num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_partition_size,
        seed=seed,
    )
    chosen.dataset = datasets.Dataset.from_dict(
        {"idx": pool.astype(np.int64), "label": labels.astype(np.int64)}
    )
    # [:] reads the column as one array (a bare ["idx"] is a lazy Column that
    # np.asarray would walk row by row: seconds for a 50,000-sample pool).
    share = chosen.load_partition(partition_id).with_format("numpy")[:]["idx"]
    return np.asarray(share, dtype=pool.dtype)


def round_fold(partition: np.ndarray, server_round: int, num_rounds: int) -> np.ndarray:
    """Return the fold a site sees in ``server_round`` (1-based) of ``num_rounds``.

    The partition is cut into ``num_rounds`` near-equal folds, so every sample
    arrives exactly once over the run: the paper's continuous arrival.
    """
    if not 1 <= server_round <= num_rounds:
        raise ValueError(
            f"server-round must be in [1, {num_rounds}], got {server_round}"
        )
    return np.array_split(partition, num_rounds)[server_round - 1]
