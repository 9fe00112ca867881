"""Client-side clipping for client-level DP: Flower's own mods, fitted to fedhash's train message.

Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` demand exactly one ArrayRecord in the
message they get, but fedhash's train message carries two: "arrays" (the trainable parameters,
whose update is clipped) and "globals" (frozen buffers the server sets). :func:`train_clipping_mod`
hides "globals" from Flower's mod and hands it back to the handler.
"""
from __future__ import annotations

import json

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

ARRAYS = "arrays"   # the ArrayRecord the update is computed on (Flower strategies' default key)
CONFIG = "config"


def _adaptive(config) -> bool:
    """Whether the server runs ``DifferentialPrivacyClientSideAdaptiveClipping``.

    Both client-side wrappers send only "clipping_norm", so the mod reads the run's ``dp_clipping``
    from the FedConfig the server sends with every message ("fedconfig", JSON)."""
    try:
        fc = json.loads(str(config.get("fedconfig", "{}")))
    except json.JSONDecodeError:
        return False
    return str(fc.get("dp_clipping", fc.get("dp-clipping", ""))) == "client-adaptive"


def train_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the reply's update to the server's "clipping_norm" with Flower's own clipping mod.

    Without "clipping_norm" in the message's "config" this is ``call_next(msg, context)``.
    Otherwise every ArrayRecord but "arrays" is taken out of the message, Flower's
    ``adaptiveclipping_mod`` (run config ``dp-clipping = "client-adaptive"``: it also adds
    "norm_bit" to the reply's metrics) or ``fixedclipping_mod`` runs on it, and the records are
    put back before the handler runs, so the handler still sees "globals". The reply must carry
    one ArrayRecord (same keys, same order as "arrays") and, for adaptive clipping, one MetricRecord.
    """
    config = msg.content.config_records.get(CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    hidden = {k: v for k, v in msg.content.array_records.items() if k != ARRAYS}
    for k in hidden:
        del msg.content[k]

    def restore(m: Message) -> None:
        for k, v in hidden.items():
            if k not in m.content:
                m.content[k] = v

    def call_with_all_records(m: Message, ctx: Context) -> Message:
        restore(m)
        return call_next(m, ctx)

    mod = adaptiveclipping_mod if _adaptive(config) else fixedclipping_mod
    try:
        return mod(msg, context, call_with_all_records)
    finally:
        restore(msg)  # also when Flower's mod refused the message before calling the handler
