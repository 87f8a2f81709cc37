"""The command line: clear errors without tracebacks, dry runs that touch nothing, verify's exit code."""

import json
import os
import pathlib
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main

CONFIG = """
input: {{paths: ["{corpus}/*.parquet"], id_column: doc_id, rows_per_item: 10}}
model: {{path: "{model}", max_length: 32}}
output: {{path: "{out}"}}
compute: {{batch_rows: 16}}
"""


@pytest.fixture
def local_job(tmp_path, tiny_embedding_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(25)], "text": [f"doc {i}" for i in range(25)]}),
                   corpus / "a.parquet", row_group_size=10)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(CONFIG.format(corpus=corpus, model=tiny_embedding_model, out=tmp_path / "out"))
    return cfg, tmp_path / "out"


def test_dry_run_prints_the_plan_and_touches_no_output(local_job, capsys):
    cfg, out = local_job
    assert main(["embed", str(cfg), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "plan: 1 file(s), 3 work item(s), 25 rows" in err and "tokens" in err
    assert not out.exists()
    speed = ["--set", "compute.estimate_tokens_per_gpu_s=0.01", "--set", "compute.estimate_usd_per_gpu_hour=2",
             "--set", "compute.max_replicas=4"]
    assert main(["embed", str(cfg), "--dry-run", "--json", *speed]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out.strip().splitlines()[-1])
    hours = plan["est_tokens"] / 0.01 / 3600
    assert plan["est_tokens"] > 0 and plan["est_gpu_hours"] == pytest.approx(hours, abs=1e-3)
    assert plan["est_cost_usd"] == pytest.approx(2 * hours, abs=0.01)
    assert plan["est_wall_hours"] == pytest.approx(hours / 4, abs=1e-3)
    assert "GPU-hours at 0.01 tokens/s per GPU" in captured.err and "$2.00/GPU-hour" in captured.err


@pytest.mark.parametrize("override, message", [
    ("model.dimension=3", "model.dimension: Extra inputs are not permitted"),
    ("input.paths=[/nonexistent/*.parquet]", "'/nonexistent/*.parquet' matches no file"),
    ("input.text_column=body", "column(s) ['body'] not found"),
])
def test_user_mistakes_exit_2_with_one_clear_line(local_job, capsys, override, message):
    cfg, out = local_job
    assert main(["embed", str(cfg), "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_console_script_reports_config_errors_without_traceback(local_job):
    cfg, _ = local_job
    script = pathlib.Path(sys.executable).parent / "embedrank"
    proc = subprocess.run([str(script), "embed", str(cfg), "--set", "compute.max_replicas=0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 2
    assert "compute.max_replicas: Input should be greater than or equal to 1" in proc.stderr
    assert str(cfg) in proc.stderr and "Traceback" not in proc.stderr


def test_model_mismatches_are_caught_before_any_work(local_job, capsys):
    cfg, out = local_job
    assert main(["embed", str(cfg), "--set", "model.dimensions=4096"]) == 2
    assert "model.dimensions=4096 exceeds the model's embedding size 64" in capsys.readouterr().err
    assert main(["embed", str(cfg), "--set", f"model.path={out.parent}"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert not out.exists()


def test_pickle_only_models_are_refused(local_job, tmp_path, tiny_embedding_model, capsys):
    cfg, out = local_job
    unsafe = tmp_path / "unsafe-model"
    unsafe.mkdir()
    (unsafe / "config.json").write_text((tiny_embedding_model / "config.json").read_text())
    (unsafe / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(["embed", str(cfg), "--set", f"model.path={unsafe}"]) == 2
    assert "only pickle files ['pytorch_model.bin'], which embedrank never loads" in capsys.readouterr().err
    assert main(["embed", str(cfg), "--set", "model.trust_remote_code=true"]) == 2
    assert "model.trust_remote_code: Extra inputs are not permitted" in capsys.readouterr().err
    assert not out.exists()


def test_errors_from_remote_actors_are_recovered_from_rays_text():
    from common.errors import ModelLoadError
    from pipelines.cli import _user_error

    remote = RuntimeError("The actor died because of an error raised in its creation task\n  File x\n"
                          "common.errors.ModelLoadError: model.path 'm': cannot load model (boom)")
    found = _user_error(remote)
    assert isinstance(found, ModelLoadError) and str(found) == "model.path 'm': cannot load model (boom)"
    assert _user_error(RuntimeError("a bug")) is None


@pytest.mark.integration
def test_verify_exit_code_follows_the_invariant(ray_local, local_job, capsys):
    cfg, out = local_job
    assert main(["embed", str(cfg)]) == 0
    assert main(["verify", str(out)]) == 0
    assert "invariant holds" in capsys.readouterr().out
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished" and status["items_committed"] == status["items_total"] > 0
    assert status["rows"] + status["rejected"] == status["planned_rows"] and status["last_commit"]
    assert main(["status", str(out / "nothing-here")]) == 2
    assert "no _job.json" in capsys.readouterr().err
    _status_exits_cleanly_every_time(out, status)
    victim = sorted((out / "data").iterdir())[0]
    table = pq.read_table(victim)
    pq.write_table(table.slice(1), victim)
    assert main(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert "checksum differs" in report and "invariant VIOLATED" in report


STATUS_RUNS = 12


def _status_exits_cleanly_every_time(out, expected):
    """`embedrank status` (text and --json) as a separate process, many times: each must exit 0 with its report.

    It used to abort at interpreter exit (134, "terminate called without an active exception") in about one run
    in four: an Arrow pool thread released the Python bytes a Parquet control file was read from after the
    interpreter had begun to finalise (`pipelines.parquet_bytes`)."""
    script = pathlib.Path(sys.executable).parent / "embedrank"
    codes = []
    for n in range(STATUS_RUNS):
        json_mode = n % 2 == 1
        proc = subprocess.run([str(script), "status", str(out), *(["--json"] if json_mode else [])],
                              capture_output=True, text=True, timeout=120, env={**os.environ})
        codes.append(proc.returncode)
        if json_mode:
            assert json.loads(proc.stdout)["rows"] == expected["rows"]
        else:
            assert f"rows {expected['rows']:,} committed" in proc.stdout
        assert "terminate called" not in proc.stderr
    assert codes == [0] * STATUS_RUNS


@pytest.fixture
def tiny_bert(tmp_path):
    """A BGE/E5-like checkpoint (BertModel: CLS or mean pooling, its own prompts), saved as safetensors."""
    from transformers import BertConfig, BertModel

    path = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    return path


def test_models_of_another_architecture_are_refused_naming_what_is_supported(
        local_job, tiny_bert, tiny_embedding_model, tiny_reranker_model, capsys):
    cfg, out = local_job
    assert main(["embed", str(cfg), "--set", f"model.path={tiny_bert}"]) == 2
    err = capsys.readouterr().err
    assert f"model.path '{tiny_bert}' is a bert model (BertModel); embed implements the pooling and prompts of " \
           "Qwen3 only (model_type qwen3: Qwen3Model or Qwen3ForCausalLM" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # a Qwen3 reranker checkpoint is a Qwen3ForCausalLM: an embedding may use it, so the check lets it through
    assert main(["embed", str(cfg), "--dry-run", "--set", f"model.path={tiny_reranker_model}"]) == 0
    capsys.readouterr()
    # the reranker reads the LM head's yes/no rows: the tiny embedding checkpoint (a Qwen3Model) is refused for it
    from common.errors import ModelLoadError
    from pipelines.preflight import preflight_model

    with pytest.raises(ModelLoadError, match=r"is a qwen3 model \(Qwen3Model\); rerank implements the pooling "
                                             r"and prompts of Qwen3 only \(model_type qwen3: Qwen3ForCausalLM"):
        preflight_model(str(tiny_embedding_model), task="rerank")
    preflight_model(str(tiny_reranker_model), task="rerank")
    assert not out.exists()
