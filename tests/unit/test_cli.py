# Tests for the `moreh-ap plan` command (models built on the meta device).
import json

import pytest

from moreh_ap.cli import main, parse_size
from moreh_ap.config import ParallelConfig

pytestmark = pytest.mark.timeout(120)


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "plan" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "--devices-per-node" in capsys.readouterr().out


def test_parse_size():
    assert parse_size("64GiB") == 64 * 2**30 and parse_size("80GB") == 80 * 10**9 and parse_size("1024") == 1024
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="64GiB"):
        parse_size("lots")


def test_plan_gpt2_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["plan", "--model", "gpt2", "--batch-size", "8", "--seq-len", "512", "--nodes", "1",
               "--devices-per-node", "4", "--preset", "a100-40gb", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0
    d = json.loads(out)  # exactly one JSON object on stdout
    assert set(d) >= {"selected", "candidates", "planning_ms"}
    assert ParallelConfig.from_dict(d["selected"]["config"]).validate(4, 8, 12)
    assert d["selected"]["line"] == (tmp_path / "advanced_parallelization_selected_config.dump").read_text().strip()
    assert all({"config", "feasible", "memory", "step_time", "reason"} <= set(c) for c in d["candidates"])
    assert "train: true" in err


def test_plan_table_options_and_config_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
           "num_attention_heads": 4, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rc = main(["plan", "--model", str(tmp_path / "config.json"), "--batch-size", "4", "--seq-len", "128",
               "--devices-per-node", "2", "--device-memory", "8GiB", "--peak-tflops", "100", "--no-pipeline",
               "--activation-recomputation", "false", "--no-mixed-precision"])
    out = capsys.readouterr().out
    assert rc == 0 and "verdict" in out and "selected" in out
    assert "num_stages : 1" in out


def test_plan_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["plan", "--batch-size", "8", "--seq-len", "128", "--devices-per-node", "2"]
    assert main(base + ["--model", "nope", "--preset", "h200"]) == 1
    assert "llama2-13b" in capsys.readouterr().err
    assert main(base + ["--model", "gpt2", "--device-memory", "8GiB"]) == 1
    assert "--peak-tflops" in capsys.readouterr().err
    assert main(base + ["--model", "gpt2", "--device-memory", "1MiB", "--peak-tflops", "10"]) == 2
    err = capsys.readouterr().err
    assert "OUT_OF_MEMORY" in err and "Ways out" in err
    assert not (tmp_path / "advanced_parallelization_selected_config.dump").exists()


def test_seed_case_llama2_13b(tmp_path, monkeypatch, capsys):
    """The seed's case: exit status, JSON on stdout, logs on stderr, dump file."""
    monkeypatch.chdir(tmp_path)
    argv = ["plan", "--model", "llama2-13b", "--batch-size", "8", "--seq-len", "1024", "--nodes", "4",
            "--devices-per-node", "1", "--preset", "moreh-64gb", "--json"]
    # at the default 80% cap nothing fits (bench/README: 56.0 GB needed vs 54.96 GB); at 90% it picks
    monkeypatch.setenv("MOREH_ADVANCED_PARALLELIZATION_MEMORY_USAGE_CORRECTION_RATIO", "90")
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "The number of candidates is" in err
    assert rc == 0, err
    d = json.loads(out)
    assert len(d["candidates"]) >= 30
    plain = [c for c in d["candidates"] if c["config"]["num_stages"] == 1 and not c["config"]["distribute_param"]
             and not c["config"]["recomputation"]]
    assert plain and all(not c["feasible"] and "out of memory" in c["reason"] for c in plain)
    line = (tmp_path / "advanced_parallelization_selected_config.dump").read_text().strip()
    assert ParallelConfig.from_moreh_line(line).num_stages == d["selected"]["config"]["num_stages"]


def test_calibration_file_formats_and_errors(tmp_path, monkeypatch, capsys):
    """--calibration reads a moreh_ap DB entry or cache file as well as a profile; bad files name the flag."""
    from moreh_ap.planner.calibration_db import CalibrationDB, write_entry

    monkeypatch.chdir(tmp_path)
    db = CalibrationDB(fingerprint={"device": "x", "torch": "t", "threads": 1, "world": 0},
                       matmul={"bf16": [[1024.0, 50e12]], "fp32": [[1024.0, 10e12]]},
                       block_efficiency={"bf16": 1.5}, block_floor={"bf16": 1e-3})
    (tmp_path / "entry.json").write_text(json.dumps(db.to_dict()))
    write_entry(tmp_path / "cache.json", db)
    base = ["plan", "--model", "gpt2", "--batch-size", "8", "--seq-len", "128", "--preset", "h100-80gb", "--json"]
    times = []
    for name in ("entry.json", "cache.json"):
        assert main(base + ["--calibration", str(tmp_path / name)]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["cluster"]["calibration"] == f"file:{name}"
        times.append(d["selected"]["step_time"])
    assert times[0] == times[1]
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    assert main(base + ["--calibration", str(tmp_path / "bad.json")]) == 1
    assert "--calibration" in capsys.readouterr().err


def test_hf_config_and_config_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 1000}
    (tmp_path / "hf.json").write_text(json.dumps(cfg))
    line = ("num_stages : 1, num_micro_batches : 2, batch_per_device : 2, No TP, recomputation : 1, "
            "distribute_param : false, distribute_low_prec_param : false")
    base = ["plan", "--batch-size", "4", "--seq-len", "128", "--preset", "h200", "--config", line]
    outs = []
    for src in (json.dumps(cfg), str(tmp_path / "hf.json")):
        assert main(base + ["--hf-config", src]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["step_time"] == outs[1]["step_time"] > 0
    assert outs[0]["line"] == line and outs[0]["model"]["blocks"] == 4 and outs[0]["feasible"]
    assert main(base[:-1] + ["num_stages : 3, num_micro_batches : 2, batch_per_device : 2", "--hf-config",
                             json.dumps(cfg)]) == 1
    assert main(base + ["--hf-config", '{"hidden_size": 2}']) == 1
    assert "model_type" in capsys.readouterr().err
