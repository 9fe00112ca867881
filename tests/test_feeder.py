"""fedhash simulate's tweaks of Flower's simulation engine (simulations/engine.py): the message feeder
that hands new messages to the simulated silos, polling every 10 ms instead of 0.1 s (config key
feed-interval), and the grid's reply poll (pull-interval)."""
from __future__ import annotations

import inspect
import queue
import threading
import time

import pytest

from hashing.config import Config
from hashing.errors import ConfigError
from simulations import engine

vce_api = pytest.importorskip("flwr.server.superlink.fleet.vce.vce_api")


@pytest.fixture
def restore_feeder():
    before = vce_api.add_messages_to_queue
    had = hasattr(vce_api, "flwr_add_messages_to_queue")
    orig = getattr(vce_api, "flwr_add_messages_to_queue", None)
    yield
    vce_api.add_messages_to_queue = before
    if had:
        vce_api.flwr_add_messages_to_queue = orig
    elif hasattr(vce_api, "flwr_add_messages_to_queue"):
        del vce_api.flwr_add_messages_to_queue


class FakeState:
    """The two LinkState calls the feeder makes: pending messages per node, counted."""

    def __init__(self, pending: dict[int, list[str]]):
        self.pending = pending
        self.calls = 0
        self.lock = threading.Lock()

    def get_message_ins(self, node_id: int, limit: int):
        with self.lock:
            self.calls += 1
            out, self.pending[node_id] = self.pending[node_id][:limit], self.pending[node_id][limit:]
            return out

    def add(self, node_id: int, msg: str) -> None:
        with self.lock:
            self.pending[node_id].append(msg)


def _run_feeder(state: FakeState, nodes: dict[int, int], seconds: float) -> tuple[list[str], float]:
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    th = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, q, nodes, stop))
    th.start()
    time.sleep(seconds)
    t0 = time.perf_counter()
    stop.set()
    th.join(5)
    assert not th.is_alive(), "the feeder did not stop when asked"
    return [q.get_nowait() for _ in range(q.qsize())], time.perf_counter() - t0


FAST = Config().feed_interval  # the default: 10 ms


def test_fast_feeder_replaces_flowers_loop_once(restore_feeder):
    assert FAST == 0.01
    flwr_loop = vce_api.add_messages_to_queue
    assert "f_stop.wait(0.1)" in inspect.getsource(getattr(vce_api, "flwr_add_messages_to_queue", flwr_loop))
    assert engine.fast_feeder(FAST) is True
    assert vce_api.add_messages_to_queue is not vce_api.flwr_add_messages_to_queue
    assert "f_stop.wait(0.1)" in inspect.getsource(vce_api.flwr_add_messages_to_queue)
    assert engine.fast_feeder(FAST) is True  # again: wraps Flower's loop, not its own
    assert "f_stop.wait(0.1)" in inspect.getsource(vce_api.flwr_add_messages_to_queue)
    # run_api looks the loop up by name when it starts its thread: the engine gets the new one
    assert "target=add_messages_to_queue" in inspect.getsource(vce_api.run_api)


def test_fast_feeder_moves_every_message_in_node_order_and_polls_often(restore_feeder):
    engine.fast_feeder(FAST)
    state = FakeState({7: ["a1", "a2"], 3: ["b1"]})
    got, stop_s = _run_feeder(state, {7: 0, 3: 1}, 0.3)
    # one message per node per pass, nodes in the mapping's order, none lost or repeated
    assert got == ["a1", "b1", "a2"]
    assert stop_s < 1.0
    passes = state.calls / 2
    assert passes >= 10, f"{passes} passes in 0.3 s: the feeder still polls every 0.1 s"

    # Flower's own interval, through the config: few passes in the same time
    engine.fast_feeder(0.1)
    slow = FakeState({7: [], 3: []})
    _run_feeder(slow, {7: 0, 3: 1}, 0.3)
    assert slow.calls / 2 <= 5
    # switched off (0): Flower's own loop again
    assert engine.fast_feeder(0) is False
    assert vce_api.add_messages_to_queue is vce_api.flwr_add_messages_to_queue


def test_a_message_posted_later_reaches_the_queue_within_the_interval(restore_feeder):
    engine.fast_feeder(FAST)
    state = FakeState({1: []})
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    th = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, q, {1: 0}, stop))
    th.start()
    try:
        time.sleep(0.05)
        waits = []
        for i in range(5):
            t0 = time.perf_counter()
            state.add(1, f"m{i}")
            assert q.get(timeout=5) == f"m{i}"
            waits.append(time.perf_counter() - t0)
    finally:
        stop.set()
        th.join(5)
    assert sorted(waits)[2] < 0.05, f"median hand-over {sorted(waits)[2]:.3f} s"


@pytest.mark.parametrize("key", ["feed-interval", "pull-interval"])
@pytest.mark.parametrize("bad", ["fast", "-1", "5"])
def test_bad_interval_is_one_line_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=f"'{key}'") as e:
        Config.from_dict({key: bad}, source="scenario x.toml")
    assert "\n" not in str(e.value) and "x.toml" in str(e.value)


def test_an_unchecked_flower_version_keeps_flowers_loop(restore_feeder, monkeypatch, caplog):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    before = vce_api.add_messages_to_queue
    assert engine.fast_feeder(FAST) is False
    assert vce_api.add_messages_to_queue is getattr(vce_api, "flwr_add_messages_to_queue", before)
    assert "9.9.9" in caplog.text and "Flower's own" in caplog.text


def test_the_reply_poll_is_set_on_the_simulation_grid_only(monkeypatch):
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    grid = InMemoryGrid.__new__(InMemoryGrid)  # the attribute alone; no LinkState needed
    grid.pull_interval = 0.1
    assert engine.tune_grid(grid, Config()) is True and grid.pull_interval == 0.01
    grid.pull_interval = 0.1
    assert engine.tune_grid(grid, Config(pull_interval=0.0)) is False and grid.pull_interval == 0.1
    assert engine.tune_grid(object(), Config()) is False  # a real deployment's grid: untouched


def test_a_changed_flower_loop_is_left_alone(restore_feeder, monkeypatch, caplog):
    def add_messages_to_queue(state, queue, f_stop):  # a future signature
        pass

    monkeypatch.setattr(vce_api, "add_messages_to_queue", add_messages_to_queue)
    if hasattr(vce_api, "flwr_add_messages_to_queue"):
        monkeypatch.delattr(vce_api, "flwr_add_messages_to_queue")
    assert engine.fast_feeder(FAST) is False
    assert vce_api.add_messages_to_queue is add_messages_to_queue
    assert "feeder changed" in caplog.text
