"""
nanochat/energy.py with a fake NVML module in place of pynvml: the energy-counter path, the
power-sampling path (trapezoid integral, daemon thread, failed reads bridged), and every way
to be unavailable (no pynvml, no GPU, a GPU that reports neither); the stage clock's totals
across a resume, and summed over 2 gloo ranks; then the real pynvml on this machine, whatever
it has.
"""

import os
import sys
import threading
import time
import types

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import nanochat.energy as energy
from conftest import free_port
from nanochat.energy import EnergyMeter, StageClock, energy_for_report


class FakeNVMLError(Exception):
    pass


def fake_nvml(energy_mj=None, watts=None, init_error=False):
    """A pynvml stand-in. `energy_mj` / `watts`: callables giving the current reading, or None
    for "not supported" (raises NVMLError, as NVML does on GPUs without the feature)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError
    nvml.calls = {"power": 0}

    def init():
        if init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def energy_reading(handle):
        assert handle == "gpu0"
        if energy_mj is None:
            raise FakeNVMLError("Not Supported")
        return energy_mj()

    def power_reading(handle):
        assert handle == "gpu0"
        nvml.calls["power"] += 1
        value = None if watts is None else watts()
        if value is None:
            raise FakeNVMLError("Not Supported")
        return int(value * 1000)  # NVML reports mW

    nvml.nvmlInit = init
    nvml.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy_reading
    nvml.nvmlDeviceGetPowerUsage = power_reading
    return nvml


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_energy_counter_difference(monkeypatch):
    counter = {"mj": 5_000_000}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=lambda: counter["mj"], watts=lambda: 250.0))
    meter = EnergyMeter()
    assert meter.available and meter.method == "energy counter" and meter.reason == ""
    assert meter.elapsed_wh() is None  # not started
    meter.start()
    counter["mj"] += 1_800_000  # 1800 J = 0.5 Wh
    assert meter.elapsed_wh() == pytest.approx(0.5)
    counter["mj"] += 5_400_000
    assert meter.stop() == pytest.approx(2.0)
    assert meter.stop() is None  # stopped: nothing more to report
    assert meter.read_watts() == 250.0


def test_power_sampling_integrates_with_the_trapezoid_rule(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(energy.time, "monotonic", clock)
    # power rising linearly 100 W -> 460 W over 3600 s: the trapezoid rule is exact for it
    nvml = fake_nvml(energy_mj=None, watts=lambda: 100.0 + 0.1 * (clock.t - 100.0))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    meter = EnergyMeter(interval_s=3600)  # no periodic sample during the test: start + stop only
    assert meter.available and meter.method == "power sampling"
    meter.start()
    clock.t += 3600
    assert meter.stop() == pytest.approx((100 + 460) / 2)  # mean W x 1 h = Wh


def test_power_sampling_thread_samples_and_bridges_failed_reads(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(energy.time, "monotonic", clock)
    state = {"failing": False, "failed": 0}

    def watts():
        if state["failing"]:
            state["failed"] += 1
            return None
        return 360.0

    nvml = fake_nvml(energy_mj=None, watts=watts)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    meter = EnergyMeter(interval_s=0.001)
    meter.start()
    assert any(t.name == "energy-meter" and t.daemon for t in threading.enumerate())
    for i in range(10):  # advance the clock while the thread samples: constant power, so any split is exact
        state["failing"] = 3 <= i < 6  # NVML hiccups for a while; the next good sample bridges the gap
        clock.t += 1.0
        time.sleep(0.01)
    state["failing"] = False
    assert meter.elapsed_wh() <= 1.0 + 1e-9
    assert meter.stop() == pytest.approx(360.0 * 10 / 3600)
    assert state["failed"] > 0 and nvml.calls["power"] > 4  # the thread took samples of its own
    assert not any(t.name == "energy-meter" for t in threading.enumerate())


def test_restart_measures_from_zero(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(energy.time, "monotonic", clock)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=None, watts=lambda: 3600.0))
    meter = EnergyMeter(interval_s=3600)
    meter.start()
    clock.t += 10
    assert meter.stop() == pytest.approx(10.0)
    meter.start()
    clock.t += 1
    assert meter.stop() == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["no pynvml", "no driver", "neither reading"])
def test_unavailable_reads_none(monkeypatch, case):
    if case == "no pynvml":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    else:
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error=case == "no driver"))
    meter = EnergyMeter()
    assert not meter.available and meter.method is None
    assert {"no pynvml": "nvidia-ml-py", "no driver": "cannot open GPU 0",
            "neither reading": "neither"}[case] in meter.reason
    meter.start()
    assert meter.elapsed_wh() is None and meter.stop() is None and meter.read_watts() is None
    assert energy_for_report(meter.stop()) == "n/a"


def test_energy_for_report():
    assert energy_for_report(None) == "n/a"
    assert energy_for_report(12.3456) == 12.35


def test_stage_clock_sums_over_a_resumed_run(monkeypatch):
    counter, now = {"mj": 1_000_000}, {"t": 1000.0}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=lambda: counter["mj"]))
    monkeypatch.setattr(energy.time, "time", lambda: now["t"])
    loop_state = {"smooth_train_loss": 0.0}
    clock = StageClock(loop_state)
    now["t"] += 60
    counter["mj"] += 3_600_000  # 1 Wh
    clock.update()  # before a checkpoint: the totals so far go into loop_state
    assert loop_state == {"smooth_train_loss": 0.0, "wall_time_s": 60.0, "energy_wh": pytest.approx(1.0)}

    resumed = StageClock(dict(loop_state))  # a new process, from the checkpoint's loop_state
    now["t"] += 30
    counter["mj"] += 1_800_000
    assert resumed.report_items() == {"wall time (s)": 90.0, "energy (Wh)": 1.5}


def test_stage_clock_without_nvml_reports_wall_time_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    now = {"t": 0.0}
    monkeypatch.setattr(energy.time, "time", lambda: now["t"])
    clock = StageClock({})
    now["t"] += 12.34
    assert clock.report_items() == {"wall time (s)": 12.3, "energy (Wh)": "n/a"}


def _stage_clock_worker(rank, world_size, port, results):
    """One rank of a torchrun job: each rank's GPU used (rank + 1) x the energy of rank 0's,
    and rank r's clock ran 60 (r + 1) s before the first checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        sys.modules["pynvml"] = None  # no real GPU: every reading comes from the list below
        # this rank's readings in Wh since its meter started, one per elapsed_wh() call (stop() makes one too)
        readings = iter([1.0 * (rank + 1), 1.5 * (rank + 1),  # the first run: at the checkpoint, at the end
                         0.5 * (rank + 1),  # the resumed run, at the end
                         2.0 if rank == 0 else None])  # a run where rank 1 has no NVML
        energy.EnergyMeter.elapsed_wh = lambda self: next(readings)
        now = {"t": 1000.0}
        energy.time = types.SimpleNamespace(time=lambda: now["t"], monotonic=time.monotonic)

        loop_state = {}
        clock = energy.StageClock(loop_state, device_index=rank)
        now["t"] += 60 * (rank + 1)
        clock.update()  # before the checkpoint
        saved = [dict(loop_state)]
        dist.broadcast_object_list(saved, src=0)  # the checkpoint holds rank 0's loop_state
        results.put((rank, "checkpoint", dict(loop_state)))
        now["t"] += 30
        results.put((rank, "end", clock.report_items()))

        resumed = energy.StageClock(dict(saved[0]))  # every rank of the resumed job loads rank 0's
        now["t"] += 30
        results.put((rank, "resumed end", resumed.report_items()))

        results.put((rank, "rank 1 without NVML", energy.StageClock({}).report_items()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_stage_clock_sums_energy_over_ranks_and_counts_a_resume_once():
    results = mp.get_context("spawn").Queue()
    mp.spawn(_stage_clock_worker, args=(2, free_port(), results), nprocs=2, join=True)
    got = {}
    for _ in range(8):
        rank, name, value = results.get(timeout=30)
        got[rank, name] = value
    # 1 + 2 Wh at the checkpoint, on every rank alike; the wall time is each rank's own
    assert got[0, "checkpoint"] == {"wall_time_s": 60.0, "energy_wh": pytest.approx(3.0)}
    assert got[1, "checkpoint"] == {"wall_time_s": 120.0, "energy_wh": pytest.approx(3.0)}
    for rank in range(2):
        assert got[rank, "end"]["energy (Wh)"] == 4.5  # 1.5 + 3.0
        assert got[rank, "resumed end"]["energy (Wh)"] == 4.5  # 3.0 saved + 0.5 + 1.0 since, not 3.0 again
        assert got[rank, "rank 1 without NVML"]["energy (Wh)"] == "n/a"
    assert got[0, "end"]["wall time (s)"] == 90.0 and got[0, "resumed end"]["wall time (s)"] == 90.0  # rank 0's


def test_real_nvml_on_this_machine_never_raises():
    meter = EnergyMeter()
    meter.start()
    time.sleep(0.05)
    wh = meter.stop()
    if meter.available:
        assert wh is not None and wh >= 0
    else:
        assert wh is None and meter.reason
