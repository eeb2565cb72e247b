"""LegacySampleSelection: the sample-selection server behind Flower's legacy API."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

from flwr.app import Array, ArrayRecord
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from flwr_select.npy import NpyError, header_of
from flwr_select.selection.server import SelectionServer, SiteReport, site_report
from flwr_select.selection.wire import IDS, IMAGES, LABELS, UploadError, wire_bytes
from strategies.nodes import digest_of

EvaluateFn = Callable[
    [int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None
]


def site_key(cid: str) -> int:
    """Return the buffer's site key for a client: its cid if numeric, else a hash.

    Flower's legacy proxies carry the node id as cid, so a site gets the same
    key as under the Message API. Any other cid is hashed with SHA-256 (stable
    across processes, unlike ``hash``) to an unsigned 64-bit integer.

    Examples
    --------
    >>> site_key("42"), site_key("site-a") == site_key("site-a")
    (42, True)
    """
    if cid.isdigit() and int(cid) < 2**64:
        return int(cid)
    return int.from_bytes(hashlib.sha256(cid.encode()).digest()[:8], "big")


def unpack_fit_res(res: FitRes) -> tuple[ArrayRecord, SiteReport]:
    """Return the upload in a ``FitRes`` as wire arrays, and the site's report.

    The parameters are three ``.npy`` byte strings ``[images, labels, ids]``;
    only their headers are read here (to name each array's dtype and shape),
    everything else is checked by
    :meth:`~strategies.sample_selection.SampleSelection.check_upload` as for
    any upload.

    Raises
    ------
    UploadError
        If the parameters are not three ``.npy`` headers, or the metrics are
        not a site's.
    """
    tensors = res.parameters.tensors
    if res.parameters.tensor_type != "numpy.ndarray" or len(tensors) != 3:
        raise UploadError(
            "an upload is 3 numpy.ndarray tensors [images, labels, ids], got "
            f"{len(tensors)} of type {res.parameters.tensor_type!r}"
        )
    arrays = {}
    for name, data in zip((IMAGES, LABELS, IDS), tensors, strict=True):
        try:
            dtype, shape, _, _ = header_of(data)
        except (NpyError, TypeError) as err:
            raise UploadError(f"{name} is not a readable array: {err}") from None
        arrays[name] = Array(str(dtype), shape, "numpy.ndarray", bytes(data))
    return ArrayRecord(arrays), site_report(res.metrics)


class LegacySampleSelection(Strategy):
    """The sample-selection server for ``ServerApp(config=..., strategy=...)``.

    Every round the sampled clients get the current model and the selection
    config in a ``FitIns``; each ``FitRes`` carries an upload as parameters
    ``[images, labels, ids]`` and ``num-candidates`` in its metrics (see
    :class:`clients.legacy.SelectNumPyClient`). The server core checks and
    buffers every upload under the client's :func:`site_key` and trains the
    model (:meth:`~flwr_select.selection.server.SelectionServer.accept_uploads`);
    round metrics land in its ``rounds``, with ``bytes-sent``: what the round's
    ``FitIns`` weighed on the wire, one copy per client.

    Parameters
    ----------
    server : SelectionServer
        The server core (a :class:`~strategies.sample_selection.SampleSelection`
        is one): the model, buffer, selection and training config.
    evaluate_fn : callable, optional
        ``(server_round, ndarrays, config) -> (loss, metrics) | None``, as for the
        legacy ``FedAvg``: centralized evaluation.
    fraction_train, min_train_nodes, min_available_nodes
        As for the legacy ``FedAvg``'s ``fraction_fit``, ``min_fit_clients`` and
        ``min_available_clients``.

    Notes
    -----
    Legacy parameters carry plain ndarrays, so ``compress`` is refused. The
    ``max-bytes`` budget is checked on the wire arrays rebuilt from them, not on
    the legacy transport's own encoding.
    """

    def __init__(
        self,
        server: SelectionServer,
        *,
        evaluate_fn: EvaluateFn | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
    ) -> None:
        if server.selection.compress:
            raise ValueError("the legacy API carries plain ndarrays: set compress off")
        self.server = server
        self.evaluate_fn = evaluate_fn
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.bytes_sent = 0

    def __repr__(self) -> str:
        return f"LegacySampleSelection({self.server.selection})"

    def _parameters(self) -> Parameters:
        state = self.server.model.state_dict()
        return ndarrays_to_parameters([v.cpu().numpy() for v in state.values()])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        """Return the server's model weights (state_dict values in order).

        Called once before round 1: a server that does not know the shape of a
        sample, or whose model cannot take the data, is refused here (see
        ``SelectionServer.check_model``).
        """
        self.server.check_model()
        return self._parameters()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send the model and the selection config to the sampled clients.

        What each ``FitIns`` weighs as the message Flower's legacy layer turns it
        into is counted once per client in :attr:`bytes_sent`.
        """
        self.bytes_sent = 0
        if self.fraction_train == 0.0:
            return []
        size = int(client_manager.num_available() * self.fraction_train)
        clients = client_manager.sample(
            num_clients=max(size, self.min_train_nodes),
            min_num_clients=self.min_available_nodes,
        )
        config: dict[str, Scalar] = dict(self.server.round_config(server_round))
        ins = FitIns(parameters, config)
        content = recorddict_compat.fitins_to_recorddict(ins, keep_input=True)
        self.bytes_sent = len(clients) * wire_bytes(content)
        return [(client, ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check and buffer every upload, then train the model on the buffer."""
        # in the order of what they carry, not of arrival (see content_digest)
        ordered = sorted(
            results, key=lambda result: digest_of(result[1].parameters.tensors)
        )
        uploads = [
            (site_key(client.cid), functools.partial(unpack_fit_res, res))
            for client, res in ordered
        ]
        metrics = self.server.accept_uploads(
            server_round, uploads, failures=len(failures)
        )
        metrics["bytes-sent"] = self.bytes_sent
        trained = "train-loss" in metrics
        return (self._parameters() if trained else None), dict(metrics)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Return no evaluation instructions: sites do not evaluate."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Return no loss and no metrics: sites do not evaluate."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate the model with ``evaluate_fn``, if one was given."""
        if self.evaluate_fn is None:
            return None
        return self.evaluate_fn(server_round, parameters_to_ndarrays(parameters), {})
