"""The engine's thread count (the cgroup's CPU quota by default, read from fixture files here, not the host's) and
the CPU kernels' dynamic chunks: the same bits whatever the threads and however the chunks fall, errors raised
from any chunk, callers on two threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from paged_cases import scattered_case

from loraplex.engine.core.config import ModelConfig, load_config
from loraplex.engine.core.errors import ConfigError
from loraplex.engine.kernels.cpu import extension
from loraplex.engine.model.loader import cache_root
from loraplex.engine.model.threads import (
    available_cpus,
    cgroup_cpu_limit,
    default_threads,
    parse_cfs,
    parse_cpu_max,
    set_threads,
)


def write_files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("200000 100000\n", 2.0),
        ("150000 100000", 1.5),
        ("50000 100000", 0.5),
        ("max 100000\n", None),
        ("", None),
        ("lots 100000", None),
        ("-1 100000", None),
    ],
)
def test_cpu_max_is_quota_over_period(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


@pytest.mark.parametrize(("quota", "period", "cpus"), [("300000\n", "100000\n", 3.0), ("-1\n", "100000\n", None)])
def test_cfs_quota_over_period(quota: str, period: str, cpus: float | None) -> None:
    assert parse_cfs(quota, period) == cpus


def test_v2_takes_the_tightest_limit_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    root = write_files(
        tmp_path,
        {
            "kubepods/pod1/ctr/cpu.max": "max 100000\n",
            "kubepods/pod1/cpu.max": "250000 100000\n",
            "kubepods/cpu.max": "800000 100000\n",
        },
    )
    assert cgroup_cpu_limit(root, "0::/kubepods/pod1/ctr\n") == 2.5


def test_v2_in_a_cgroup_namespace_reads_the_mount_top(tmp_path: Path) -> None:
    root = write_files(tmp_path, {"cpu.max": "100000 100000\n"})
    assert cgroup_cpu_limit(root, "0::/\n") == 1.0


def test_v2_without_a_limit_is_none(tmp_path: Path) -> None:
    root = write_files(tmp_path, {"app/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, "0::/app\n") is None
    assert cgroup_cpu_limit(tmp_path / "nothing-mounted", "0::/app\n") is None


def test_v1_reads_the_cpu_hierarchy_where_the_container_sees_it(tmp_path: Path) -> None:
    # the host's path (no cgroup namespace) does not exist in the container: its own cgroup is the mount's top
    files = {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    root = write_files(tmp_path, files)
    membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    assert cgroup_cpu_limit(root, membership) == 1.5


def test_v1_without_a_quota_is_none(tmp_path: Path) -> None:
    root = write_files(tmp_path, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, "3:cpu:/\n") is None


@pytest.mark.parametrize(
    ("cpus", "limit", "threads"), [(2, None, 2), (64, 2.5, 2), (2, 4.0, 2), (4, 0.5, 1), (16, 1.99, 1), (1, None, 1)]
)
def test_default_threads_fit_the_quota_rounded_down(cpus: int, limit: float | None, threads: int) -> None:
    assert default_threads(cpus, limit) == threads


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads_takes_an_explicit_count_or_the_default(restore_threads: None) -> None:
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    expected = default_threads(available_cpus(), cgroup_cpu_limit())
    assert set_threads(0) == expected and torch.get_num_threads() == expected


def test_num_threads_defaults_to_the_quota_and_takes_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config().model.num_threads == 0
    monkeypatch.setenv("LORAPLEX_MODEL_NUM_THREADS", "3")
    assert load_config().model.num_threads == 3
    with pytest.raises(ConfigError, match="num_threads = -1"):
        ModelConfig(num_threads=-1)


@pytest.fixture(scope="module")
def kernels() -> None:
    assert extension.load(cache_root(ModelConfig())), "the CPU kernels did not build"


def kernel_calls() -> dict[str, Callable[[], torch.Tensor]]:
    """One call of each kernel on inputs big enough to be cut into many chunks."""
    torch.manual_seed(0)
    x, weight, rows = torch.randn(40, 576), torch.randn(1000, 576), torch.randn(600, 576)
    packed = torch.ops.loraplex.pack_linear_weight(weight)
    cache, q, tables, lens = scattered_case(9, 3, 64, 16, [1, 70, 33, 16, 17, 5, 200], torch.float32, num_blocks=64)
    rank, num_slots = 8, 3
    a_packed, b_packed_t = torch.randn(num_slots * rank, 576), torch.randn(num_slots * rank, 192)
    slots, slot_ranks = torch.arange(40) % 4, torch.tensor([8, 4, 2])

    def attention() -> torch.Tensor:
        out = torch.empty_like(q)
        torch.ops.loraplex.paged_decode_attention(q, cache.key_cache[0], cache.value_cache[0], tables, lens, 0.1, out)
        return out

    def lora(rows: int) -> torch.Tensor:
        out = torch.zeros(rows, 192)
        torch.ops.loraplex.lora_decode_delta(x[:rows], a_packed, b_packed_t, slots[:rows], rank, slot_ranks, out)
        return out

    return {
        "panel_linear": lambda: torch.ops.loraplex.panel_linear(x, packed, 1000),
        "pack_linear_weight": lambda: torch.ops.loraplex.pack_linear_weight(weight),
        "row_major_linear": lambda: torch.ops.loraplex.row_major_linear(x[:3], weight),
        "rms_norm": lambda: torch.ops.loraplex.rms_norm(rows, weight[0], 1e-5),
        "paged_decode_attention": attention,
        "lora_decode_delta_rows": lambda: lora(7),
        "lora_decode_delta_slots": lambda: lora(40),
    }


def test_kernels_give_the_same_bits_whatever_the_threads_and_scheduler(kernels: None, restore_threads: None) -> None:
    calls = kernel_calls()
    torch.set_num_threads(1)
    want = {name: call() for name, call in calls.items()}
    for threads in (2, 3, 5):  # more threads than cores too: helpers then often start late
        torch.set_num_threads(threads)
        for dynamic in (True, False):
            torch.ops.loraplex.set_dynamic_split(dynamic)
            try:
                for name, call in calls.items():
                    assert torch.equal(call(), want[name]), (name, threads, dynamic)
            finally:
                torch.ops.loraplex.set_dynamic_split(True)


def test_an_error_in_a_chunk_reaches_the_caller_and_the_kernels_go_on(kernels: None, restore_threads: None) -> None:
    torch.set_num_threads(2)
    cache, q, tables, lens = scattered_case(4, 2, 16, 4, [9] * 64, torch.float32, num_blocks=256)
    bad = tables.clone()
    bad[50, 1] = 999  # one sequence near the end: a chunk that either thread may run
    op, out = torch.ops.loraplex.paged_decode_attention, torch.empty_like(q)
    with pytest.raises(RuntimeError, match="block id outside the cache"):
        op(q, cache.key_cache[0], cache.value_cache[0], bad, lens, 0.25, out)
    torch.set_num_threads(1)
    want = torch.empty_like(q)
    op(q, cache.key_cache[0], cache.value_cache[0], tables, lens, 0.25, want)
    torch.set_num_threads(2)
    op(q, cache.key_cache[0], cache.value_cache[0], tables, lens, 0.25, out)
    assert torch.equal(out, want)


def test_callers_on_two_threads_at_once_each_get_their_own_result(kernels: None, restore_threads: None) -> None:
    weight = torch.randn(2048, 576)
    packed = torch.ops.loraplex.pack_linear_weight(weight)
    inputs = [torch.randn(12, 576) for _ in range(2)]
    torch.set_num_threads(1)
    want = [torch.ops.loraplex.panel_linear(x, packed, 2048) for x in inputs]
    failures: list[int] = []

    def call_repeatedly(i: int) -> None:
        torch.set_num_threads(2)  # per thread, as OpenMP's setting is
        for _ in range(200):
            if not torch.equal(torch.ops.loraplex.panel_linear(inputs[i], packed, 2048), want[i]):
                failures.append(i)

    threads = [threading.Thread(target=call_repeatedly, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
