"""GPU discovery, index translation, placement over all providers and the memory cap, as pure functions; the
NVML adapter fed by a stand-in for the driver's library (``FakeDriver``: it replaces only pynvml)."""

from __future__ import annotations

import sys
import types

import pytest

from hub.config import ConfigError, ProviderConfig, parse_config
from hub.supervisor.gpus import (
    Card,
    CardReading,
    Nvml,
    NvmlDevice,
    Occupant,
    discover,
    need_mb,
    normalize_pci,
    place,
    provider_cards,
)
from hub.supervisor.process import uses_gpu, worker_env

pytestmark = pytest.mark.timeout(30)

# four cards in PCI (NVML) order; a faster model sits on the last two, so CUDA's default order would differ
NODE = [
    NvmlDevice(0, "GPU-aaaa0000-0000", "0000:1a:00.0", "NVIDIA L4"),
    NvmlDevice(1, "GPU-bbbb1111-1111", "0000:3b:00.0", "NVIDIA L4"),
    NvmlDevice(2, "GPU-cccc2222-2222", "0000:5e:00.0", "NVIDIA H100"),
    NvmlDevice(3, "GPU-dddd3333-3333", "0000:86:00.0", "NVIDIA H100"),
]


class FakeDriver:
    """What pynvml answers on a node: the cards above, their memory, and the processes on each."""

    def __init__(
        self, used: dict[int, float], processes: dict[int, dict[int, float]], names_as_bytes: bool = False
    ) -> None:
        self.used, self.processes, self.bytes = used, processes, names_as_bytes

    def _s(self, text: str) -> str | bytes:
        return text.encode() if self.bytes else text

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(NODE)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(NODE):
            raise RuntimeError("Invalid Argument")  # what the driver says to an index it does not have
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str | bytes:
        return self._s(NODE[h].uuid)

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self._s(NODE[h].name)

    def nvmlDeviceGetPciInfo(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(busId=self._s("0000" + NODE[h].pci_bus_id.upper()))  # NVML's 8-digit domain

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        used = self.used.get(h, 0.0) * 2**20
        return types.SimpleNamespace(used=used, free=24576 * 2**20 - used, total=24576 * 2**20)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[types.SimpleNamespace]:
        return [
            types.SimpleNamespace(pid=pid, usedGpuMemory=mb * 2**20) for pid, mb in self.processes.get(h, {}).items()
        ]


def test_nvml_lists_cards_and_reads_each_process_memory_by_pid() -> None:
    driver = FakeDriver(used={1: 5000.0}, processes={1: {4242: 1200.0, 4343: 800.0}}, names_as_bytes=True)
    nvml = Nvml(driver)
    assert nvml.devices() == NODE  # bytes from old pynvml releases, NVML's 8-digit PCI domain normalised
    reading = nvml.read(1)
    assert (reading.used_mb, reading.total_mb, reading.free_mb, reading.utilization) == (5000.0, 24576.0, 19576.0, 37.0)
    assert reading.processes == {4242: 1200.0, 4343: 800.0}  # each worker its own, the card's used beside them
    assert "NVML 9" in nvml.read(9).error and nvml.read(9).used_mb is None


def test_no_driver_is_a_reason_not_a_failure() -> None:
    class Missing:
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    nvml = Nvml(Missing())
    assert not nvml.available and nvml.devices() is None and "Not Found" in nvml.read(0).error


def test_pci_ids_from_nvml_and_from_cuda_compare_equal() -> None:
    assert normalize_pci("00000000:3B:00.0") == normalize_pci("0000:3b:00.0") == "0000:3b:00.0"
    assert normalize_pci("") == ""


def test_without_a_mask_the_hub_uses_every_nvml_card_in_pci_order_pinned_by_uuid() -> None:
    found = discover({}, NODE)
    assert [(c.ordinal, c.nvml_index, c.mask) for c in found.cards] == [(i, i, NODE[i].uuid) for i in range(4)]
    assert found.warnings == () and "all 4" in found.source


def test_an_inherited_mask_is_the_hub_set_and_devices_index_within_it() -> None:
    found = discover({"CUDA_VISIBLE_DEVICES": "3,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, NODE)
    assert [(c.ordinal, c.nvml_index, c.pci_bus_id) for c in found.cards] == [
        (0, 3, "0000:86:00.0"),
        (1, 1, "0000:3b:00.0"),
    ]
    cards, problem = provider_cards((1,), found)
    assert [c.nvml_index for c in cards] == [1] and problem == ""  # devices: [1] is the mask's second card
    cards, problem = provider_cards((0, 2), found)
    assert [c.nvml_index for c in cards] == [3] and "devices [2] are not among the hub's 2 GPU(s)" in problem
    # a worker's mask is always one of the inherited cards: it cannot escape the allocation
    assert {c.mask for c in found.cards} == {NODE[3].uuid, NODE[1].uuid}


def test_uuid_masks_the_device_plugin_and_no_gpu_words() -> None:
    by_prefix = discover({"CUDA_VISIBLE_DEVICES": "GPU-cccc,GPU-aaaa0000"}, NODE)
    assert [c.nvml_index for c in by_prefix.cards] == [2, 0]
    plugin = discover({"NVIDIA_VISIBLE_DEVICES": f"{NODE[2].uuid},{NODE[0].uuid}"}, NODE)
    assert [c.nvml_index for c in plugin.cards] == [2, 0] and "NVIDIA_VISIBLE_DEVICES" in plugin.source
    assert len(discover({"NVIDIA_VISIBLE_DEVICES": "all"}, NODE).cards) == 4
    for env in ({"CUDA_VISIBLE_DEVICES": ""}, {"NVIDIA_VISIBLE_DEVICES": "void"}, {"CUDA_VISIBLE_DEVICES": "none"}):
        assert discover(env, NODE).cards == ()
    # CUDA_VISIBLE_DEVICES wins over the plugin's variable, as in CUDA itself
    assert [
        c.nvml_index for c in discover({"CUDA_VISIBLE_DEVICES": "1", "NVIDIA_VISIBLE_DEVICES": "all"}, NODE).cards
    ] == [1]


def test_an_invalid_entry_ends_the_list_with_a_warning() -> None:
    found = discover({"CUDA_VISIBLE_DEVICES": "1,7,2"}, NODE)
    assert [c.nvml_index for c in found.cards] == [1] and "'7' is not a GPU index here" in found.warnings[0]
    ambiguous = discover({"CUDA_VISIBLE_DEVICES": "GPU-"}, NODE)
    assert ambiguous.cards == () and "matches 4 GPU UUIDs" in ambiguous.warnings[0]
    assert [c.nvml_index for c in discover({"CUDA_VISIBLE_DEVICES": "2,2"}, NODE).cards] == [2]


def test_index_masks_on_a_mixed_node_warn_unless_pci_order_is_set() -> None:
    mixed = discover({"CUDA_VISIBLE_DEVICES": "0,2"}, NODE)
    assert any("CUDA_DEVICE_ORDER=PCI_BUS_ID" in w for w in mixed.warnings)
    assert discover({"CUDA_VISIBLE_DEVICES": "0,2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, NODE).warnings == ()
    assert discover({"CUDA_VISIBLE_DEVICES": "0,1"}, NODE[:2]).warnings == ()  # one model: the orders agree


def test_without_nvml_a_mask_is_taken_as_given_and_listed_devices_on_trust() -> None:
    masked = discover({"CUDA_VISIBLE_DEVICES": "2,MIG-1234"}, None)
    assert [(c.ordinal, c.mask, c.nvml_index) for c in masked.cards] == [(0, "2", None), (1, "MIG-1234", None)]
    blind = discover({}, None)
    assert not blind.known and blind.cards == ()
    assert [c.mask for c in provider_cards((0, 1), blind)[0]] == ["0", "1"]
    assert provider_cards(None, blind)[0] == ()  # nothing listed, nothing known: no GPU


def _cards(n: int) -> list[Card]:
    return list(discover({}, NODE[:n]).cards)


def test_workers_of_all_providers_spread_over_the_cards() -> None:
    cards, occupants = _cards(2), []
    for provider in ("whisper", "whisper", "funasr", "funasr", "whisper", "funasr"):
        card = place(provider, cards, occupants, {}).card
        assert card is not None
        occupants.append(Occupant(card.ordinal, provider, None, starting=True))
    per_card = [[o.provider for o in occupants if o.ordinal == c.ordinal] for c in cards]
    assert sorted(map(sorted, per_card)) == [["funasr", "funasr", "whisper"], ["funasr", "whisper", "whisper"]]
    assert all({"whisper", "funasr"} <= set(p) for p in per_card)  # each provider on both cards


def test_placement_prefers_the_card_another_tenant_left_free() -> None:
    cards = _cards(3)
    readings = {0: CardReading(20000.0, 24576.0), 1: CardReading(300.0, 24576.0), 2: CardReading(9000.0, 24576.0)}
    assert place("whisper", cards, [], readings).card == cards[1]
    draining = [Occupant(1, "funasr", 2000.0)]  # a draining worker still holds its card
    assert place("whisper", cards, draining, readings).card == cards[2]


def test_the_cap_is_off_by_default() -> None:
    full = {0: CardReading(24000.0, 24576.0)}
    assert place("whisper", _cards(1), [Occupant(0, "whisper", 2000.0)], full).card is not None


def test_the_cap_holds_back_a_spawn_where_no_card_has_room_for_the_measured_need() -> None:
    cards = _cards(2)
    occupants = [Occupant(0, "whisper", 2000.0), Occupant(1, "funasr", 500.0)]
    # card 1 is full of another tenant's memory; card 0 has room for one more 2000 MiB worker under 90 %
    readings = {0: CardReading(8000.0, 24576.0), 1: CardReading(23000.0, 24576.0)}
    assert place("whisper", cards, occupants, readings, fraction=0.9).card == cards[0]
    readings[0] = CardReading(21000.0, 24576.0)  # 0.9 x 24576 - 21000 = 1118 MiB < 2000
    held = place("whisper", cards, occupants, readings, fraction=0.9)
    assert (
        held.card is None
        and "needs about 2000 MiB" in held.held_back
        and "max_gpu_memory_fraction=0.9" in held.held_back
    )
    assert place("whisper", cards, occupants, readings, fraction=0.0).card is not None


def test_starting_workers_count_at_their_providers_need() -> None:
    cards = _cards(1)
    readings = {0: CardReading(6000.0, 10000.0)}  # 4000 MiB free
    occupants = [Occupant(0, "whisper", 3000.0), Occupant(0, "whisper", 100.0, starting=True)]
    # the starting one will grow to 3000: 4000 - 2900 leaves 1100, too little for another 3000
    assert "GPU memory cap" in place("whisper", cards, occupants, readings, fraction=1.0).held_back
    assert place("whisper", cards, occupants[:1], readings, fraction=1.0).card == cards[0]


def test_an_unmeasured_provider_starts_one_worker_at_a_time_under_the_cap() -> None:
    cards, readings = _cards(2), {0: CardReading(0.0, 10000.0), 1: CardReading(0.0, 10000.0)}
    first = place("funasr", cards, [], readings, fraction=0.8)
    assert first.card is not None
    loading = [Occupant(first.card.ordinal, "funasr", 50.0, starting=True)]
    assert "waiting for the first funasr worker" in place("funasr", cards, loading, readings, fraction=0.8).held_back
    # a need remembered from an earlier worker (one that has since exited) is used at once
    assert place("funasr", cards, loading, readings, fraction=0.8, remembered=900.0).card is not None
    assert need_mb("funasr", [Occupant(0, "funasr", 700.0), Occupant(1, "funasr", 900.0)], 800.0) == 900.0


def test_no_cards_means_the_cpu() -> None:
    assert place("whisper", [], [], {}).card is None and place("whisper", [], [], {}).held_back == ""


def test_worker_environment_pins_one_card_in_pci_order() -> None:
    card = discover({"CUDA_VISIBLE_DEVICES": "2"}, NODE).cards[0]
    env = worker_env(ProviderConfig(name="w", type="whisper", cpu_threads=2), card)
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"], env["OMP_NUM_THREADS"]) == (
        NODE[2].uuid,
        "PCI_BUS_ID",
        "2",
    )
    cpu = worker_env(ProviderConfig(name="w", type="whisper"), None)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_which_providers_are_placed_on_gpus() -> None:
    assert uses_gpu(ProviderConfig(name="w", type="whisper")) and uses_gpu(
        ProviderConfig(name="e", type="echo", device="cuda")
    )
    assert not uses_gpu(ProviderConfig(name="w", type="whisper", device="cpu"))
    assert not uses_gpu(ProviderConfig(name="e", type="echo"))


def test_config_devices_default_to_all_and_the_cap_is_checked() -> None:
    config = parse_config({"providers": {"echo": {"pool": {"max_gpu_memory_fraction": 0.85}}}})
    assert config.providers["echo"].devices is None and config.providers["echo"].pool.max_gpu_memory_fraction == 0.85
    with pytest.raises(ConfigError, match="providers.echo.pool.max_gpu_memory_fraction: must be 0"):
        parse_config({"providers": {"echo": {"pool": {"max_gpu_memory_fraction": 1.5}}}})
    with pytest.raises(ConfigError, match="providers.echo.devices: give at least one"):
        parse_config({"providers": {"echo": {"devices": []}}})


def test_gpu_workers_find_the_cuda_extras_libraries(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``cuda`` extra's wheels put libcublas and libcudnn under site-packages/nvidia/*/lib, where the
    loader does not look: a GPU worker gets those directories on LD_LIBRARY_PATH, a CPU worker does not."""
    for package in ("cublas", "cudnn"):
        (tmp_path / "nvidia" / package / "lib").mkdir(parents=True)
        (tmp_path / "nvidia" / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "nvidia" or m.startswith("nvidia.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/site/lib")
    card = discover({}, NODE).cards[0]
    env = worker_env(ProviderConfig(name="w", type="whisper"), card)
    expected = [str(tmp_path / "nvidia" / p / "lib") for p in ("cublas", "cudnn")]
    assert env["LD_LIBRARY_PATH"].split(":") == [*expected, "/opt/site/lib"]
    assert worker_env(ProviderConfig(name="w", type="whisper"), None)["LD_LIBRARY_PATH"] == "/opt/site/lib"


def test_the_bench_pins_bare_processes_as_the_hub_pins_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import settings

    monkeypatch.setattr(settings, "hub_cards", lambda: discover({"CUDA_VISIBLE_DEVICES": "2,0,3"}, NODE).cards)
    cards = settings.pin("cuda", 5)
    assert [c.nvml_index for c in cards if c] == [2, 0, 3, 2, 0]
    env = settings.process_env(1, cards[1])
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"], env["OMP_NUM_THREADS"]) == (
        NODE[0].uuid,
        "PCI_BUS_ID",
        "1",
    )
    assert settings.nvml_indices(cards) == (0, 2, 3) and settings.pin("cpu", 2) == [None, None]


def test_the_cuda_bench_is_bounded_by_the_gpus_not_the_cores(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import __main__ as bench_main

    monkeypatch.setattr(bench_main, "hub_cards", lambda: discover({}, NODE[:2]).cards)
    with pytest.raises(SystemExit):
        bench_main.main(["--device", "cuda", "--max-workers", "5", "--per-gpu", "2"])  # 2 GPUs x 2 = 4
    assert "exceeds 2 GPU(s) x --per-gpu 2 = 4" in capsys.readouterr().err
    monkeypatch.setattr(bench_main, "hub_cards", lambda: ())
    with pytest.raises(SystemExit):
        bench_main.main(["--device", "cuda"])
    assert "no GPU here" in capsys.readouterr().err
