"""SelectNumPyClient: the remote site behind Flower's legacy ``NumPyClient`` API."""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar
from torch import nn

from clients.site import load_ledger, save_ledger
from flwr_select.config import check
from flwr_select.data import SiteData
from flwr_select.models import Transform
from flwr_select.selection.protocol import SelectionConfig, SiteRequest
from flwr_select.selection.site import site_round
from flwr_select.selection.wire import IDS, IMAGES, LABELS


class SelectNumPyClient(NumPyClient):
    """A site for :class:`strategies.legacy.LegacySampleSelection`.

    ``fit`` trial-tests the received model on the site's samples, selects, and
    returns the upload as ``[images, labels, ids]`` ndarrays with the site's
    metrics (``num-candidates`` among them); see
    :func:`flwr_select.selection.site.site_round`.

    Parameters
    ----------
    site : SiteData
        The samples this site offers.
    model_fn : callable
        Returns a fresh model (the architecture the parameters belong to).
    context : Context
        The ``Context`` that ``client_fn`` receives: the ids already sent are
        kept in its state (as the Message API handler keeps them), because
        ``ClientApp(client_fn=...)`` builds a new client for every message.
    site_key : int (default: 0)
        Seeds the site's choices with the round (e.g. its partition id).
    transform : str or callable, optional
        How raw samples become model input, the same as the server's (see
        :func:`flwr_select.models.model_input`). Default: as stored.

    Notes
    -----
    The legacy API cannot carry compressed uploads.
    """

    def __init__(
        self,
        site: SiteData,
        model_fn: Callable[[], nn.Module],
        context: Context,
        *,
        site_key: int = 0,
        transform: Transform = None,
    ) -> None:
        self.site = site
        self.model_fn = model_fn
        self.context = context
        self.site_key = site_key
        self.transform = transform

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Return the upload ``[images, labels, ids]``, its size and the metrics.

        The config is read as strictly as the Message API handler reads it
        (:class:`SiteRequest`, :class:`SelectionConfig`), and the parameters
        must be the model's arrays exactly (:func:`model_state`).
        """
        request = SiteRequest.from_config(config)
        selection = SelectionConfig.from_config(config)
        model = self.model_fn()
        model.load_state_dict(model_state(model, parameters))
        ledger = load_ledger(self.context)
        upload, metrics = site_round(
            model,
            self.site,
            selection,
            server_round=request.server_round,
            site_key=self.site_key,
            ledger=ledger,
            transform=self.transform,
        )
        save_ledger(self.context, ledger)
        arrays = [upload[name].numpy() for name in (IMAGES, LABELS, IDS)]
        return arrays, len(arrays[2]), metrics


def model_state(model: nn.Module, parameters: NDArrays) -> dict[str, torch.Tensor]:
    """Return ``parameters`` as ``model``'s state, or refuse them naming the array.

    One array per entry of the model's ``state_dict``, in its order, each of
    exactly its dtype and shape: ``load_state_dict`` would cast another dtype
    silently.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming the parameter that is not the model's.
    """
    state = model.state_dict()
    check(
        "parameters",
        f"{len(parameters)} arrays",
        len(parameters) == len(state),
        f"the {len(state)} arrays of the model",
    )
    for (name, like), array in zip(state.items(), parameters, strict=True):
        want = (torch.empty(0, dtype=like.dtype).numpy().dtype, tuple(like.shape))
        got = (array.dtype, array.shape)
        check(
            f"parameters[{name!r}]",
            f"{got[0]} of shape {got[1]}",
            got == want,
            f"{want[0]} of shape {want[1]}",
        )
    return {
        name: torch.from_numpy(a) for name, a in zip(state, parameters, strict=True)
    }
