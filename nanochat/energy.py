"""
GPU energy for the report card: how many watt-hours one GPU used while a stage ran, read
through NVML (the `pynvml` module of the nvidia-ml-py package, the library nvidia-smi uses).

    meter = EnergyMeter()          # device 0
    meter.start()
    ...                            # train
    wh = meter.stop()              # float Wh, or None where NVML cannot tell (CPU, no driver)
    report_row = {"energy (Wh)": energy_for_report(wh)}

Two ways to measure, the first the GPU supports:
1. the energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ since the driver loaded):
   stop() - start(), exact and free;
2. power sampling (nvmlDeviceGetPowerUsage, mW) every `interval_s` in a daemon thread,
   integrated with the trapezoid rule, for GPUs whose driver has no energy counter.
Without NVML or a GPU `available` is False and every reading is None, so the caller needs no
branch of its own. API: https://docs.nvidia.com/deploy/nvml-api/group__nvmlDeviceQueries.html

StageClock adds a stage's wall time to that, both accumulated in the training loop's
loop_state so that a resumed run reports the total over all of its attempts. Under torchrun
each rank meters its own GPU and the clock sums the energy over ranks (rank 0 alone writes the
report, which would otherwise show 1/N of it); the wall time is each rank's own, and rank 0's
is the one saved and reported.

Not for: CPU or whole-system power (NVML sees the GPU only; on GB10 the CPU shares the
package, so the figure is what the driver attributes to the GPU), or for the electricity price
(report.py multiplies).
"""

import threading
import time

import torch
import torch.distributed as dist

MJ_PER_WH = 3.6e6  # 1 Wh = 3600 J = 3.6e6 mJ


def energy_for_report(wh):
    """A meter's reading as the report stores it: the Wh rounded to 0.01, or "n/a" for None."""
    return "n/a" if wh is None else round(wh, 2)


class EnergyMeter:
    """Energy one GPU uses between start() and stop(), in Wh (see the module docstring).

    Attributes:
        available: True when a reading is possible.
        method: "energy counter", "power sampling", or None (unavailable).
        reason: why it is unavailable ("" when available), for the stage's log line.
    """

    def __init__(self, device_index=0, interval_s=1.0):
        self.interval_s = interval_s
        self.available, self.method, self.reason = False, None, ""
        self._nvml = self._handle = None
        self._start_mj = None
        self._thread = self._stop_event = None
        self._lock = threading.Lock()
        self._sampled_j = 0.0
        self._last_sample = None  # (time.monotonic() s, W) of the latest power sample
        try:
            import pynvml
        except ImportError:
            self.reason = "pynvml is not installed (the nvidia-ml-py package)"
            return
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except pynvml.NVMLError as e:
            self.reason = f"NVML cannot open GPU {device_index}: {e}"
            return
        self._nvml = pynvml
        if self._read_mj() is not None:
            self.method = "energy counter"
        elif self.read_watts() is not None:
            self.method = "power sampling"
        else:
            self.reason = f"GPU {device_index} reports neither its energy counter nor its power draw to NVML"
            return
        self.available = True

    def _read_mj(self):
        """The GPU's energy counter in mJ, or None when it has none."""
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except self._nvml.NVMLError:
            return None

    def read_watts(self):
        """The GPU's power draw now, in W, or None when NVML cannot tell."""
        if self._nvml is None:
            return None
        try:
            return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        except self._nvml.NVMLError:
            return None

    def _take_sample(self):
        """Add the trapezoid from the previous power sample to now (J); a failed read is
        skipped, so the next trapezoid bridges the gap."""
        watts = self.read_watts()
        if watts is None:
            return
        now = time.monotonic()
        with self._lock:
            if self._last_sample is not None:
                t0, w0 = self._last_sample
                self._sampled_j += (w0 + watts) / 2 * (now - t0)
            self._last_sample = (now, watts)

    def _sample_loop(self):
        while not self._stop_event.wait(self.interval_s):
            self._take_sample()

    def start(self):
        """Start measuring (again from zero). A no-op when unavailable."""
        if not self.available:
            return
        if self.method == "energy counter":
            self._start_mj = self._read_mj()
            return
        self._stop_sampler()
        with self._lock:
            self._sampled_j, self._last_sample = 0.0, None
        self._take_sample()
        self._stop_event = threading.Event()
        # daemon: a stage that dies without stop() must still be able to exit
        self._thread = threading.Thread(target=self._sample_loop, name="energy-meter", daemon=True)
        self._thread.start()

    def elapsed_wh(self):
        """Wh used since start(), without stopping (e.g. to save with a checkpoint), or None
        when unavailable or not started. Power sampling counts up to the latest sample."""
        if not self.available:
            return None
        if self.method == "energy counter":
            now_mj = self._read_mj()
            if self._start_mj is None or now_mj is None:
                return None
            return (now_mj - self._start_mj) / MJ_PER_WH
        if self._thread is None:
            return None
        with self._lock:
            return self._sampled_j / 3600.0

    def stop(self):
        """Stop measuring and return the Wh used since start() (None when unavailable or not started)."""
        if self.method == "power sampling" and self._thread is not None:
            self._stop_sampler()
            self._take_sample()  # the stretch since the last periodic sample
            with self._lock:
                wh = self._sampled_j / 3600.0
            self._thread = None
            return wh
        wh = self.elapsed_wh()
        self._start_mj = None
        return wh

    def _stop_sampler(self):
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()


def _sum_over_ranks(values):
    """Sum a list of floats over the ranks of torch.distributed (the list itself without it).

    A collective: every rank must call it at the same point, or the job hangs.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return values
    # NCCL reduces CUDA tensors only (on the device compute_init made current), gloo CPU ones
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return t.tolist()


class StageClock:
    """A stage's wall time (s) and GPU energy (Wh, via NVML when available) for the report card,
    accumulated in `loop_state` so that a resumed run reports the total over all its attempts.

    Call update() before each checkpoint save (so the totals travel with the checkpoint) and
    report_items() at the end for the two keys report.py sums: "wall time (s)", "energy (Wh)".
    Under torch.distributed both are collectives (every rank calls them at the same points):
    loop_state["energy_wh"] holds the total over all ranks, the same on every rank, and only the
    energy each rank used since its last update is summed, so a resumed run, which starts from
    rank 0's saved total, counts nothing twice. loop_state["wall_time_s"] is this rank's own.
    """

    def __init__(self, loop_state, device_index=0):
        self.loop_state = loop_state
        loop_state.setdefault("wall_time_s", 0.0)
        loop_state.setdefault("energy_wh", 0.0)
        self.meter = EnergyMeter(device_index=device_index)
        self.meter.start()
        self.last_time, self.last_wh = time.time(), 0.0

    def update(self):
        """Add the wall time and the energy (all ranks) since the last update to loop_state."""
        self._add(self.meter.elapsed_wh())

    def report_items(self):
        """Stop the meter; {"wall time (s)": float, "energy (Wh)": float or "n/a"} for the report,
        "n/a" when some rank's GPU gives no reading."""
        every_rank_read = self._add(self.meter.stop())
        return {"wall time (s)": round(self.loop_state["wall_time_s"], 1),
                "energy (Wh)": energy_for_report(self.loop_state["energy_wh"] if every_rank_read else None)}

    def _add(self, wh):
        """Add the time since the last call and, summed over ranks, the energy since then (`wh`:
        this rank's reading since the meter started, None when it has none) to loop_state.
        Returns True when every rank had a reading."""
        now = time.time()
        self.loop_state["wall_time_s"] += now - self.last_time
        self.last_time = now
        # a rank without a reading adds 0 and keeps last_wh: a later reading brings the gap in
        delta_wh = 0.0 if wh is None else wh - self.last_wh
        if wh is not None:
            self.last_wh = wh
        total_delta_wh, ranks_without_reading = _sum_over_ranks([delta_wh, float(wh is None)])
        self.loop_state["energy_wh"] += total_delta_wh
        return ranks_without_reading == 0
