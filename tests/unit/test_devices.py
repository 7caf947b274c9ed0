"""GPU binding rules (pure): which GPU a model rank takes, and when it is an error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dsi_mpi.devices import (
    SHARE_ENV,
    DeviceError,
    choose_poll,
    gpu_for,
    model_device,
    share_requested,
    visible_gpus,
)

FOUR = ("0", "1", "2", "3")


@pytest.mark.parametrize(
    ("cvd", "count", "expected"),
    [
        (None, 0, ()),
        (None, 3, ("0", "1", "2")),
        ("2,3", 2, ("2", "3")),
        (" 4 , 5 ", 2, ("4", "5")),
        ("GPU-aaa,GPU-bbb", 2, ("GPU-aaa", "GPU-bbb")),
        ("MIG-1c3f/1/0", 1, ("MIG-1c3f/1/0",)),
        ("0,1,7", 2, ("0", "1")),  # CUDA stops at the first invalid entry: it reports 2
        ("", 0, ()),
        ("-1", 0, ()),
        ("0,1", 4, ("0", "1")),  # a dry run without CUDA may pass a larger count
    ],
)
def test_visible_gpus_follow_cuda_visible_devices(cvd: str | None, count: int,
                                                  expected: tuple[str, ...]) -> None:
    assert visible_gpus(cvd, count) == expected


@pytest.mark.parametrize(
    ("views", "expected"),
    [
        ([FOUR], ["cuda:0"]),  # a lone model rank
        ([FOUR] * 3, ["cuda:0", "cuda:1", "cuda:2"]),  # drafter + 2 targets on 4 GPUs
        ([FOUR] * 4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),  # exactly one each
        # indices into CUDA_VISIBLE_DEVICES, not physical ids
        ([("2", "3")] * 2, ["cuda:0", "cuda:1"]),
        # srun --gpus-per-task=1: each its own first GPU
        ([("0",), ("1",), ("2",)], ["cuda:0"] * 3),
        ([("GPU-a", "GPU-b"), ("GPU-a", "GPU-b")], ["cuda:0", "cuda:1"]),
        ([("0", "1"), ("0", "1"), ("2", "3"), ("2", "3")],
         ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
    ],
)
def test_each_model_rank_of_a_node_gets_its_own_gpu(views: list[tuple[str, ...]],
                                                    expected: list[str]) -> None:
    assert [gpu_for(i, views) for i in range(len(views))] == expected


def test_more_model_ranks_than_gpus_is_a_clear_error() -> None:
    views = [("0", "1")] * 3
    assert gpu_for(1, views) == "cuda:1"
    with pytest.raises(DeviceError) as info:
        gpu_for(2, views, node="node of rank 0 (gpu17)")
    message = str(info.value)
    assert "node of rank 0 (gpu17): 3 model ranks but 2 GPU(s)" in message
    assert "coordinator" in message and f"{SHARE_ENV}=1" in message


def test_sharing_wraps_around_when_asked_for() -> None:
    views = [("0", "1")] * 5
    assert [gpu_for(i, views, share=True) for i in range(5)] == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


def test_no_visible_gpu_is_an_error_even_when_sharing() -> None:
    for share in (False, True):
        with pytest.raises(DeviceError, match="see no GPU"):
            gpu_for(0, [()], share=share)


def test_overlapping_lists_must_not_pick_the_same_gpu() -> None:
    views = [("1", "0"), ("1",)]  # both would take GPU 1
    with pytest.raises(DeviceError, match="would both use GPU 1"):
        gpu_for(0, views)
    assert gpu_for(0, views, share=True) == "cuda:0"
    assert [gpu_for(i, [("0", "1"), ("1",)]) for i in range(2)] == ["cuda:0", "cuda:0"]


def test_device_error_is_bad_input() -> None:
    from dsi_mpi.config import ConfigError

    assert issubclass(DeviceError, ConfigError)  # the CLI exits 2 with the message, no abort


@pytest.mark.parametrize(("value", "expected"),
                         [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)])
def test_share_flag(value: str, expected: bool) -> None:
    assert share_requested({SHARE_ENV: value}) is expected
    assert share_requested({}) is False


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_cpu_and_explicit_devices_pass_through_without_mpi(device: str) -> None:
    assert model_device(None, None, device) == device  # type: ignore[arg-type]


def test_the_pure_mapping_imports_without_mpi4py() -> None:
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from dsi_mpi.devices import gpu_for\n"
            "assert gpu_for(0, [('0',)]) == 'cuda:0'\n"
            "assert 'mpi4py.MPI' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ waiting strategy (--poll)

ALL = frozenset({0, 1})


@pytest.mark.parametrize(
    ("masks", "expected"),
    [
        ([ALL, ALL], "spin"),  # 2 ranks, 2 cores, unbound: this machine at 2 ranks
        ([ALL] * 9, "backoff"),  # 9 ranks on 2 cores: this machine at 9 ranks
        ([frozenset(range(8))] * 9, "backoff"),  # one rank more than cores
        ([frozenset(range(64))] * 9, "spin"),  # a GPU node: 9 ranks, 64 cores
        ([{0}, {1}, {2}], "spin"),  # bound one core each (srun --cpu-bind=cores)
        ([{0}, {0}, {1, 2, 3}], "backoff"),  # 4 cores, but two ranks are bound to the same one
        ([{0, 1}, {0}], "spin"),  # rank 0 must take core 1 so that rank 1 can have core 0
        ([{0, 1}, {0, 1}, {1, 2}], "spin"),
        ([{0, 1}, {0, 1}, {1}], "backoff"),  # three ranks within two cores
        ([{4, 5}], "spin"),
    ],
)
def test_auto_spins_only_when_every_rank_has_a_core_of_its_own(masks: list, expected: str) -> None:
    assert choose_poll("auto", masks) == expected
    assert choose_poll("spin", masks) == "spin"  # an explicit choice is kept
    assert choose_poll("backoff", masks) == "backoff"


def test_unknown_poll_is_an_error() -> None:
    with pytest.raises(ValueError, match="poll must be one of auto, spin, backoff"):
        choose_poll("busy", [ALL])


class _FakeComm:
    """allgather over made-up ranks: (node, cores) of every rank, this one included."""

    def __init__(self, everyone: list) -> None:
        self.everyone = everyone

    def allgather(self, mine: object) -> list:
        return self.everyone


def test_poll_strategy_counts_the_ranks_of_this_node_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import dsi_mpi.devices as devices

    monkeypatch.setattr(devices, "node_of_this_process", lambda: "a")
    two_cores = [0, 1]
    # Node a: 2 ranks on 2 cores; node b: 5 ranks on the same 2 core ids (another host).
    comm = _FakeComm([("a", two_cores)] * 2 + [("b", two_cores)] * 5)
    assert devices.poll_strategy(comm, "auto") == "spin"
    comm = _FakeComm([("a", two_cores)] * 3 + [("b", two_cores)])
    assert devices.poll_strategy(comm, "auto") == "backoff"
    assert devices.poll_strategy(None, "spin") == "spin"  # not collective when not auto


def test_this_process_has_cores() -> None:
    from dsi_mpi.devices import cores_of_this_process

    cores = cores_of_this_process()
    assert cores and all(isinstance(c, int) for c in cores)
