"""The issue 6 benchmark suite's plumbing (bench/run.py and its parts), never its timings.

One real run of `bench/run.py --quick --only hyper --json` (tiny shapes, one step) checks the
JSON line end to end; the rest feed the suite's pure functions hand-made part summaries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import hyper_overhead  # noqa: E402
import mixed_batch  # noqa: E402
import run as suite  # noqa: E402
import scan_compile  # noqa: E402

FIGURES = ("lora_vs_peft_speedup", "peft_vs_full_step_ratio", "mixed_vs_single_batch_ratio",
           "scan_compile_ratio_24_vs_6", "hyper_overhead_fraction", "multiprocess_loss_match")


def _timing(step_s: float, contended: int = 0) -> dict:
    return {"step_s": step_s, "step_min_s": step_s * 0.9, "contended_steps": contended}


def _lora_summary() -> dict:
    """What t5_lora_step.summarize returns, reduced to the keys the suite reads."""
    return {"speedup": 1.1, "peftjax_step_s": 0.97, "peftjax_full_ft_step_s": 1.74,
            "peftjax_step_gflop": 136.3, "achieved_gflops": 140.0, "matmul_gflops": 191.0,
            "floor_step_s": 0.71, "hf_peft_achieved_gflops": 121.0, "torch_matmul_gflops": 175.0,
            "peftjax_full_ft_achieved_gflops": 116.0, "peftjax_peak_rss_mb": 1400.0,
            "hf_peft_peak_rss_mb": 1356.0, "peftjax_full_ft_peak_rss_mb": 2375.0,
            "hf_full_ft_peak_rss_mb": 2353.0, "full_ft_speedup": 1.06,
            "contended_workers": ["hf_lora"]}


def _opts(**changes) -> object:
    opts = suite.parse_args(["--quick"])
    for key, value in changes.items():
        setattr(opts, key, value)
    return opts


def test_run_quick_prints_the_suite_json_last():
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent))
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--only", "hyper",
                           "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in FIGURES:
        assert name in out and name in out["targets"]
    assert isinstance(out["hyper_overhead_fraction"], float)  # a timing: its value is not checked
    assert out["targets"]["hyper_overhead_fraction"]["met"] == (
        out["hyper_overhead_fraction"] <= 0.05)
    # Parts not asked for stay null, with met null; nothing failed.
    assert out["lora_vs_peft_speedup"] is None
    assert out["targets"]["lora_vs_peft_speedup"]["met"] is None
    assert out["errors"] == {} and out["run"]["quick"] is True and out["run"]["parts"] == ["hyper"]
    assert out["machine"]["threads"] == 2 and len(out["machine"]["cpus"]) == 2
    hyper = out["parts"]["hyper"]
    # The constant-weights step applies exactly the adapters the hypernetwork generated.
    assert hyper["loss_first"]["full"] == pytest.approx(hyper["loss_first"]["constant"], rel=1e-6)
    gflop = hyper["step_gflop"]
    assert 0 < gflop["constant"] < gflop["full"] and 0 < gflop["generate"] < gflop["full"]
    assert hyper["flop_share"] == pytest.approx(gflop["generate"] / gflop["full"])
    assert out["peak_memory_mb"]["hyper_peftjax"] > 0


def test_targets_compare_each_figure_with_its_bound():
    values = dict.fromkeys(FIGURES)
    values.update(lora_vs_peft_speedup=3.0, peft_vs_full_step_ratio=0.71,
                  mixed_vs_single_batch_ratio=1.15, hyper_overhead_fraction=0.2,
                  multiprocess_loss_match=False)
    t = suite.targets(values, {"lora": ["hf_lora"], "mixed": []})
    assert [t[k]["met"] for k in FIGURES] == [True, False, True, None, False, False]
    assert t["lora_vs_peft_speedup"]["contended"] and not t["mixed_vs_single_batch_ratio"][
        "contended"]
    assert t["peft_vs_full_step_ratio"]["target"] == "<= 0.7"


def test_suite_summary_from_part_summaries():
    parts = {"lora": _lora_summary(),
             "mixed": {"mixed_vs_single_batch_ratio": 1.05, "peak_rss_mb": {"peftjax": 3000.0,
                                                                           "hf": 1500.0},
                       "contended": [], "mixed_vs_same_step_ratio": 1.0},
             "multiprocess": {"multiprocess_loss_match": True}}
    s = suite.suite_summary(parts, {"scan": "RuntimeError: boom"}, _opts())
    assert s["peft_vs_full_step_ratio"] == pytest.approx(0.97 / 1.74)
    assert s["lora_vs_peft_speedup"] == 1.1 and s["multiprocess_loss_match"] is True
    assert s["scan_compile_ratio_24_vs_6"] is None and s["errors"] == {"scan": "RuntimeError: boom"}
    assert s["flops"]["peftjax_lora_fraction_of_matmul"] == pytest.approx(140 / 191)
    assert s["peak_memory_mb"] == {"peftjax_lora": 1400.0, "hf_peft_lora": 1356.0,
                                   "peftjax_full_ft": 2375.0, "hf_full_ft": 2353.0,
                                   "mixed_peftjax": 3000.0, "mixed_hf_peft": 1500.0}
    assert s["contended"] == {"lora": ["hf_lora"]}
    assert s["contrast"]["mixed.mixed_vs_same_step_ratio"] == 1.0
    json.dumps(s)  # the last line must serialise


def test_multiprocess_part_reads_the_scripts_json_line(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "MULTIPROCESS_SCRIPT", tmp_path / "missing.py")
    with pytest.raises(FileNotFoundError, match="missing.py is missing"):
        suite.part_multiprocess(_opts())
    script = tmp_path / "check.py"
    script.write_text("print('starting')\nprint('{\"multiprocess_loss_match\": true, "
                      "\"max_abs_diff\": 0.0}')\n")
    monkeypatch.setattr(suite, "MULTIPROCESS_SCRIPT", script)
    result = suite.part_multiprocess(_opts())
    assert result["multiprocess_loss_match"] is True and result["max_abs_diff"] == 0.0
    script.write_text("import sys\nprint('{\"multiprocess_loss_match\": false, \"error\": "
                      "\"launch failed\"}')\nsys.exit(1)\n")
    result = suite.part_multiprocess(_opts())
    assert result["multiprocess_loss_match"] is False and result["exit_code"] == 1
    script.write_text("import sys\nprint('no json here')\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="exited 3"):
        suite.part_multiprocess(_opts())


def test_only_and_quick_options():
    opts = suite.parse_args(["--quick", "--only", "mixed, scan"])
    assert opts.parts == ["mixed", "scan"] and (opts.steps, opts.warmup, opts.quiet_wait) == (
        1, 1, 0.0)
    opts = suite.parse_args([])
    assert opts.parts == list(suite.PARTS) and (opts.steps, opts.warmup) == (10, 2)
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "lora,nope"])


def test_mixed_batches_cover_every_task():
    unpacked = mixed_batch.unpacked_batch(np.arange(16))
    assert unpacked["encoder_task_ids"].shape == (16, mixed_batch.SOURCE_LEN)
    np.testing.assert_array_equal(unpacked["decoder_task_ids"][:, -1], np.arange(16))
    packed = mixed_batch.packed_batch(16, 16)
    enc_ids, seg = packed["encoder_task_ids"], packed["encoder_segment_ids"]
    half = mixed_batch.SOURCE_LEN // 2
    np.testing.assert_array_equal(seg[0, :half], 1)
    np.testing.assert_array_equal(seg[0, half:], 2)
    # Each row holds two tasks, one per segment, and the batch holds all 16.
    assert all(len(set(row)) == 2 for row in enc_ids.tolist())
    np.testing.assert_array_equal(enc_ids[:, 0], np.arange(16))
    np.testing.assert_array_equal(enc_ids[:, -1], (np.arange(16) + 8) % 16)
    np.testing.assert_array_equal(packed["decoder_task_ids"][:, 0], enc_ids[:, 0])
    assert (packed["encoder_input_tokens"] >= 1).all()


def test_mixed_summary_headline_is_mixed_over_shared():
    pj = {name: {**_timing(t), "step_gflop": g} for name, t, g in (
        ("shared", 2.0, 100.0), ("single", 2.2, 101.0), ("mixed", 2.3, 101.0),
        ("packed_shared", 2.1, 100.0), ("packed_mixed", 2.6, 110.0),
        ("infer_shared", 0.5, 30.0), ("infer_mixed", 0.55, 30.2))}
    hf = {"single": _timing(1.0), "mixed": _timing(3.0, contended=1), "same_name": _timing(1.2)}
    s = mixed_batch.summarize({"peftjax": {"variants": pj, "rows": 16, "num_tasks": 16,
                                           "peak_rss_mb": 1.0},
                               "hf": {"variants": hf, "peak_rss_mb": 2.0}},
                              steps=3, threads=2, quick=True)
    assert s["mixed_vs_single_batch_ratio"] == pytest.approx(2.3 / 2.0)
    assert s["target_met"] is True
    assert s["mixed_vs_same_step_ratio"] == pytest.approx(2.3 / 2.2)
    assert s["packed_mixed_vs_shared_ratio"] == pytest.approx(2.6 / 2.1)
    assert s["hf_peft_infer_mixed_vs_single_ratio"] == pytest.approx(3.0)
    assert s["hf_vs_peftjax_infer_mixed_speedup"] == pytest.approx(3.0 / 0.55)
    assert s["contended"] == ["hf.mixed"]


def test_hyper_summary_shares():
    # Rounds side by side: the load doubles in round 3; per-round shares 4%, 2%, 3%.
    programs = {"full": {**_timing(1.0), "steps_s": [1.0, 1.0, 2.0], "step_gflop": 100.0,
                         "loss_first": 5.0},
                "constant": {**_timing(0.99), "steps_s": [0.96, 0.98, 1.94],
                             "step_gflop": 98.0, "loss_first": 5.0},
                "generate": {**_timing(0.06), "step_gflop": 1.5, "hyper_params": 10,
                             "generated_params": 20}}
    s = hyper_overhead.summarize({"programs": programs, "num_tasks": 8, "sites": 32,
                                  "peak_rss_mb": 1.0, "rounds": 3}, steps=1, threads=2,
                                 quick=False)
    assert s["hyper_overhead_fraction"] == pytest.approx(0.03) and s["target_met"]
    assert s["time_share_of_medians"] == pytest.approx(0.01)
    assert s["time_share_isolated"] == pytest.approx(0.06) and s["steps"] == 3
    assert s["flop_share"] == pytest.approx(0.015)
    assert s["flop_share_by_difference"] == pytest.approx(0.02)


def test_scan_summary_with_and_without_scan_layers():
    def point(layers, scan, total):
        return {"available": True, "layers": layers, "scan": scan, "lower_s": total / 4,
                "compile_s": total * 3 / 4, "total_s": total, "peak_rss_mb": 1.0,
                "contended": False}

    runs = {"scan_6": [point(6, True, 12.0), point(6, True, 10.0)],
            "scan_24": [point(24, True, 13.0)],
            "unrolled_6": [point(6, False, 10.0)], "unrolled_24": [point(24, False, 35.0)]}
    for key, seconds in (("scan_24", 0.6), ("unrolled_24", 0.5), ("unrolled_6", 0.2)):
        runs[key][0]["step_s"] = seconds
    s = scan_compile.summarize(runs, (6, 24), threads=2, quick=False)
    assert s["scan_step_over_unrolled"] == {24: pytest.approx(1.2)}  # 6: scanned not timed
    assert s["scan_compile_ratio_24_vs_6"] == pytest.approx(1.3)  # best of the two 6-layer runs
    assert s["target_met"] is True and s["unrolled_compile_ratio_24_vs_6"] == pytest.approx(3.5)
    missing = {"available": False, "error": "TypeError: unexpected keyword 'scan_layers'"}
    s = scan_compile.summarize({"scan_6": [missing], "scan_24": [missing],
                                "unrolled_6": runs["unrolled_6"],
                                "unrolled_24": runs["unrolled_24"]}, (6, 24), threads=2,
                               quick=False)
    assert s["scan_compile_ratio_24_vs_6"] is None and s["target_met"] is None
    assert "scan_layers" in s["note"] and s["unrolled_compile_ratio_24_vs_6"] == pytest.approx(3.5)
