"""Flower mods of the ClientApp.

``wire_mod`` (every message, outermost): a record of several arrays travels as one packed array
(``hashing.federated.protocol.pack_arrays``); the handlers and the other mods see the arrays themselves.

``site_errors_mod`` (every message): at a real site an error leaves without the site's paths; the whole
error, traceback included, stays in the site's own log.

``train_clipping_mod``: client-side clipping for client-level DP, on the train handler.

The server's ``DifferentialPrivacyClientSideFixedClipping`` / ``...AdaptiveClipping`` wrappers send a
``clipping_norm`` in the train message's config; this mod clips the silo's update (its reply's
ARRAYS minus the global parameters it received) to that norm with Flower's own clipping functions
(``compute_clip_model_update``, ``compute_adaptive_clip_model_update``) and, for adaptive clipping,
reports Flower's ``norm_bit``. Flower's ``fixedclipping_mod`` and ``adaptiveclipping_mod`` do the
same but demand a message of exactly one ArrayRecord, and fedhash's train message carries two
(ARRAYS and GLOBALS, the buffers the server sets); this mod reads ARRAYS by name and leaves the
message as it came.
"""
from __future__ import annotations

import logging

import numpy as np
from collections import OrderedDict

from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
    compute_clip_model_update,
)

from hashing.config import Config
from hashing.errors import FedhashError
from hashing.federated import protocol as P

from . import site


log = logging.getLogger("fedhash.client")


def unpack_content(content: RecordDict) -> None:
    """Every packed ArrayRecord of ``content`` back to its arrays, in place."""
    for name, rec in list(content.array_records.items()):
        if list(rec.keys()) == [P.PACKED]:
            arrays = P.unpack_arrays(rec[P.PACKED].numpy())
            content[name] = ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))


def pack_content(content: RecordDict) -> None:
    """Every ArrayRecord of ``content`` with more than one array packed into one, in place."""
    for name, rec in list(content.array_records.items()):
        if len(rec) > 1:
            content[name] = ArrayRecord({P.PACKED: Array(P.pack_arrays({k: rec[k].numpy() for k in rec}))})


def wire_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack the message's records, run the handler, pack the reply's."""
    if msg.has_content():
        unpack_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        pack_content(reply.content)
    return reply


class SiteError(FedhashError):
    """A real site's error as the server sees it: its kind and its text, no site path in it."""


def site_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler; at a real site an exception is logged here in full and re-raised without paths."""
    try:
        return call_next(msg, context)
    except Exception as e:
        if not site.is_site(context.node_config):
            raise
        log.error("%s failed at this site", msg.metadata.message_type, exc_info=e)
        raise SiteError(f"{type(e).__name__}: {site.site_error_text(str(e), context.node_config)}") from None


def _adaptive(config) -> bool:
    """Whether the server runs ``DifferentialPrivacyClientSideAdaptiveClipping`` (both client-side wrappers
    send only "clipping_norm"; the run's ``dp-clipping`` says which)."""
    try:
        return Config.from_json(str(config.get(P.FEDCONFIG, "{}"))).dp_clipping == "client-adaptive"
    except FedhashError:  # a config the handler refuses anyway, naming the problem
        return False


def train_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the reply's update to the server's "clipping_norm"; without one this is ``call_next(msg, context)``."""
    config = msg.content.config_records.get(P.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    sent = msg.content.array_records.get(P.ARRAYS)
    if sent is None:
        return _error(msg, f"train_clipping_mod: the message carries no {P.ARRAYS!r} record to clip against")
    clipping_norm = float(config[KEY_CLIPPING_NORM])
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    got = reply.content.array_records.get(P.ARRAYS)
    if got is None or list(got.keys()) != list(sent.keys()):
        return _error(msg, f"train_clipping_mod: the reply's {P.ARRAYS!r} record does not hold the arrays sent")
    update = got.to_numpy_ndarrays()
    adaptive = _adaptive(config)
    if adaptive and P.METRICS not in reply.content.metric_records:
        return _error(msg, f"train_clipping_mod: the reply carries no {P.METRICS!r} record for the norm bit")
    if adaptive:
        norm_bit = compute_adaptive_clip_model_update(update, sent.to_numpy_ndarrays(), clipping_norm)
        reply.content.metric_records[P.METRICS][KEY_NORM_BIT] = int(norm_bit)
    else:
        compute_clip_model_update(param1=update, param2=sent.to_numpy_ndarrays(), clipping_norm=clipping_norm)
    reply.content.array_records[P.ARRAYS] = ArrayRecord(
        {k: Array(np.asarray(v)) for k, v in zip(got.keys(), update, strict=True)})
    return reply


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
