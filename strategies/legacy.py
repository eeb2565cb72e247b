"""LegacySampleSelection: sample selection behind Flower's legacy ``Strategy`` API."""

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
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from flwr_select.npy import NpyError, header_of
from flwr_select.selection.wire import IDS, IMAGES, LABELS, UploadError
from strategies.sample_selection import SampleSelection, candidates_in

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


def unpack_fit_res(res: FitRes) -> tuple[ArrayRecord, object]:
    """Return the upload in a ``FitRes`` as wire arrays, and its ``num-candidates``.

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
    return ArrayRecord(arrays), candidates_in(res.metrics)


class LegacySampleSelection(Strategy):
    """A :class:`SampleSelection` for ``ServerApp(config=..., strategy=...)``.

    Every round all available clients (per ``fraction_train`` and the minimums
    of the wrapped strategy) get the current model and the selection config in
    a ``FitIns``; each ``FitRes`` carries an upload as parameters
    ``[images, labels, ids]`` and ``num-candidates`` in its metrics (see
    :class:`clients.legacy.SelectNumPyClient`). Uploads are validated by the
    wrapped strategy's ``check_upload`` and buffered under the client's
    :func:`site_key`; the model is trained by its ``train_on_buffer``. Round
    metrics land in the wrapped strategy's ``rounds`` as well.

    Parameters
    ----------
    strategy : SampleSelection
        Holds the model, buffer, selection and training config.
    evaluate_fn : callable, optional
        ``(server_round, ndarrays, config) -> (loss, metrics) | None``, as for the
        legacy ``FedAvg``: centralized evaluation.

    Notes
    -----
    Legacy parameters carry plain ndarrays, so ``compress`` is refused. The
    ``max-bytes`` budget is checked on the wire arrays rebuilt from them, not on
    the legacy transport's own encoding.
    """

    def __init__(
        self, strategy: SampleSelection, *, evaluate_fn: EvaluateFn | None = None
    ) -> None:
        if strategy.selection.compress:
            raise ValueError("the legacy API carries plain ndarrays: set compress off")
        self.strategy = strategy
        self.evaluate_fn = evaluate_fn

    def __repr__(self) -> str:
        return f"LegacySampleSelection({self.strategy.selection})"

    def _parameters(self) -> Parameters:
        state = self.strategy.model.state_dict()
        return ndarrays_to_parameters([v.cpu().numpy() for v in state.values()])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        """Return the wrapped model's weights (state_dict values in order).

        Called once before round 1: a strategy that does not know the shape of
        a sample is refused here (see ``SampleSelection.expected_sample_shape``).
        """
        self.strategy.expected_sample_shape()
        return self._parameters()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send the model and the selection config to the sampled clients."""
        s = self.strategy
        if s.fraction_train == 0.0:
            return []
        size = int(client_manager.num_available() * s.fraction_train)
        clients = client_manager.sample(
            num_clients=max(size, s.min_train_nodes),
            min_num_clients=s.min_available_nodes,
        )
        config: dict[str, Scalar] = dict(s.round_config(server_round))
        return [(client, FitIns(parameters, config)) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate and buffer every upload, then train the model on the buffer."""
        uploads = [
            (site_key(client.cid), functools.partial(unpack_fit_res, res))
            for client, res in results
        ]
        metrics = self.strategy.aggregate_uploads(
            server_round, uploads, failures=len(failures)
        )
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
