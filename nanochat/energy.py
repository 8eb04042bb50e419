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
loop_state so that a resumed run reports the total over all of its attempts.

Not for: CPU or whole-system power (NVML sees the GPU only; on GB10 the CPU shares the
package, so the figure is what the driver attributes to the GPU), or for the electricity price
(report.py multiplies).
"""

import threading
import time

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


class StageClock:
    """A stage's wall time (s) and GPU energy (Wh, via NVML when available) for the report card,
    accumulated in `loop_state` so that a resumed run reports the total over all its attempts.

    Call update() before each checkpoint save (so the totals travel with the checkpoint) and
    report_items() at the end for the two keys report.py sums: "wall time (s)", "energy (Wh)".
    """

    def __init__(self, loop_state, device_index=0):
        self.loop_state = loop_state
        loop_state.setdefault("wall_time_s", 0.0)
        loop_state.setdefault("energy_wh", 0.0)
        self.meter = EnergyMeter(device_index=device_index)
        self.meter.start()
        self.last_time, self.last_wh = time.time(), 0.0

    def update(self):
        """Add the wall time and energy since the last update to loop_state."""
        now, wh = time.time(), self.meter.elapsed_wh()
        self.loop_state["wall_time_s"] += now - self.last_time
        if wh is not None:
            self.loop_state["energy_wh"] += wh - self.last_wh
            self.last_wh = wh
        self.last_time = now

    def report_items(self):
        """Stop the meter; {"wall time (s)": float, "energy (Wh)": float or "n/a"} for the report."""
        self.update()
        wh = self.meter.stop()
        return {"wall time (s)": round(self.loop_state["wall_time_s"], 1),
                "energy (Wh)": energy_for_report(self.loop_state["energy_wh"] if wh is not None else None)}
