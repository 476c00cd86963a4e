"""The unmask command: info, generate (ids and tokenizer text), bench --quick."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

import unmask
from unmask import cli
from tests.helpers import tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for fragment in ("unmask", "torch", "C++ extension", "CUDA kernels compiled", "GPU present", "JAX / Pallas"):
        assert fragment in out


def test_generate_from_ids(tmp_path, capsys):
    unmask.save_pretrained(tiny_model(seed=2), tmp_path)
    assert cli.main(["generate", "--model", str(tmp_path), "--ids", "1,2,3", "--gen-length", "8",
                     "--block-length", "4", "--steps", "4"]) == 0
    captured = capsys.readouterr()
    assert "step    1" in captured.out and "step    4" in captured.out
    assert "NFE 4" in captured.err
    result_line = captured.out.strip().splitlines()[-1]
    assert all(token.isdigit() for token in result_line.split())


def test_generate_stops_at_the_eos_id_given(capsys):
    """--eos-id: generate stops there (the rest EOS) and the answer is cut there."""
    from unmask.models.checkpoint import encode_text

    model = unmask.from_pretrained(cli.default_model_path())
    prompt = encode_text(model.tokenizer, "sort:8531=", "prompt")
    full = unmask.generate(model, [prompt], gen_length=8, block_length=4, steps=8, stop_at_eos=False).tokens[0].tolist()
    eos_id = full[1]  # the answer's second token taken for the EOS
    assert cli.main(["generate", "--prompt", "sort:8531=", "--block-length", "4", "--steps", "8", "--eos-id",
                     str(eos_id), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == model.tokenizer.decode(full[:1])
    assert "NFE 4 " in captured.err, "the first block holds the EOS: the second is not decoded"
    # several (any of them ends the answer): the first token's stops it before the second's
    assert cli.main(["generate", "--prompt", "sort:8531=", "--block-length", "4", "--steps", "8", "--eos-id",
                     str(eos_id), str(full[0]), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "" and "NFE 4 " in captured.err


def test_generate_with_steps_and_threshold(capsys):
    """--steps with --threshold: SDAR's and LLaDA 2.0's rule, as generate decodes it."""
    from unmask.models.checkpoint import encode_text

    model = unmask.from_pretrained(cli.default_model_path())
    prompt = encode_text(model.tokenizer, "sort:8531=", "prompt")
    out = unmask.generate(model, [prompt], gen_length=16, block_length=8, steps=8, threshold=0.3)
    steps_only = unmask.generate(model, [prompt], gen_length=16, block_length=8, steps=8)
    assert out.nfe < steps_only.nfe, "the threshold must finish blocks early here, or this tests nothing"
    assert cli.main(["generate", "--prompt", "sort:8531=", "--gen-length", "16", "--block-length", "8", "--steps", "8",
                     "--threshold", "0.3", "--quiet"]) == 0
    assert f"NFE {out.nfe} " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --threshold and --factor exclude each other
        cli.main(["generate", "--prompt", "1+2=", "--threshold", "0.3", "--factor", "1.0", "--quiet"])


def test_generate_on_the_models_block_grid(tmp_path, capsys):
    model = tiny_model(seed=5, std=0.5, block_size=4, model_type="dream", include_qkv_bias=True)
    unmask.save_pretrained(model, tmp_path)
    arguments = ["generate", "--model", str(tmp_path), "--ids", "1,2,3,4,5,6", "--gen-length", "8", "--block-length",
                 "2", "--threshold", "0.25", "--quiet"]
    expected = {}
    for grid in ("prompt", "model"):
        out = unmask.generate(model, [[1, 2, 3, 4, 5, 6]], gen_length=8, block_length=2, threshold=0.25,
                              block_grid=grid)
        tokens = out.tokens[0].tolist()
        expected[grid] = " ".join(map(str, tokens[:tokens.index(model.eos_id)] if model.eos_id in tokens else tokens))
    assert expected["prompt"] != expected["model"]
    assert cli.main(arguments + ["--block-grid", "model"]) == 0
    assert capsys.readouterr().out.strip() == expected["model"]
    assert cli.main(arguments) == 0
    assert capsys.readouterr().out.strip() == expected["prompt"]


@pytest.mark.skipif(not (cli.default_model_path() / "config.json").exists(), reason="no bundled model in this tree")
def test_generate_speculates(capsys):
    assert cli.main(["generate", "--prompt", "sort:8531=", "--steps", "8", "--speculate", "4", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "1358" and "canvases" in captured.err
    assert cli.main(["generate", "--prompt", "sort:8531=", "--speculate", "-2", "--quiet"]) == 2
    assert "speculate must be >= 0, got -2" in capsys.readouterr().err


@pytest.mark.skipif(not (cli.default_model_path() / "config.json").exists(), reason="no bundled model in this tree")
def test_generate_with_dreams_schedule(capsys):
    # two steps per block: Dream's timesteps commit 3 tokens then 5, LLaDA's 4 and 4
    arguments = ["generate", "--prompt", "123+456=", "--gen-length", "16", "--block-length", "8", "--steps", "4",
                 "--quiet"]
    assert cli.main(arguments + ["--schedule", "dream"]) == 0
    assert capsys.readouterr().out.strip() == "579"
    assert cli.main(arguments) == 0
    assert capsys.readouterr().out.strip() == "578"


@pytest.mark.skipif(not (cli.default_model_path() / "config.json").exists(), reason="no bundled model in this tree")
def test_generate_takes_dreams_sampling_options(capsys, monkeypatch):
    arguments = ["--prompt", "sort:8531=", "--temperature", "0.5", "--top-k", "40", "--top-p", "0.8",
                 "--conf-temperature", "0.5", "--remasking", "entropy", "--seed", "3"]
    seen, generate = [], unmask.generate
    monkeypatch.setattr(unmask, "generate", lambda *args, **kwargs: seen.append(kwargs) or generate(*args, **kwargs))
    assert cli.main(["generate", *arguments, "--quiet"]) == 0
    options = dict(temperature=0.5, top_k=40, top_p=0.8, conf_temperature=0.5, remasking="entropy", seed=3)
    assert {name: seen[0][name] for name in options} == options
    model = unmask.from_pretrained(cli.default_model_path())
    out = generate(model, [model.tokenizer.encode("sort:8531=").ids], gen_length=8, block_length=8, **options)
    tokens = out.tokens[0].tolist()
    expected = model.tokenizer.decode(tokens[:tokens.index(model.eos_id)] if model.eos_id in tokens else tokens)
    assert capsys.readouterr().out == expected + "\n"
    assert cli.main(["generate", "--prompt", "1", "--conf-temperature", "0", "--quiet"]) == 2
    assert "conf_temperature must be > 0, got 0.0" in capsys.readouterr().err


@pytest.mark.skipif(not (cli.model_path("unmask-long-k4") / "config.json").exists(), reason="no student in this tree")
def test_generate_with_the_student_and_self_correction(capsys):
    assert cli.main(["generate", "--model", "unmask-long-k4", "--prompt", "sort:8531=", "--steps", "2",
                     "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == "1358"
    assert cli.main(["generate", "--model", "unmask-long", "--prompt", "bal12=", "--gen-length", "24",
                     "--block-length", "24", "--threshold", "0.5", "--revise-threshold", "0.5", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip()) == 12 and "canvases" in captured.err
    assert cli.main(["generate", "--prompt", "1+2=", "--revise-threshold", "0.5", "--quiet"]) == 2
    assert "revise_threshold needs threshold= or factor=" in capsys.readouterr().err


def test_generate_from_text_with_tokenizer(tmp_path, capsys):
    unmask.save_pretrained(tiny_model(seed=2), tmp_path)
    vocab = {f"w{i}": i for i in range(61)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "w1 w2", "--gen-length", "4",
                     "--block-length", "4", "--threshold", "0.5", "--quiet"]) == 0
    assert "w" in capsys.readouterr().out


def test_generate_errors_are_messages_not_tracebacks(tmp_path, capsys):
    unmask.save_pretrained(tiny_model(), tmp_path)
    assert cli.main(["generate", "--model", str(tmp_path), "--ids", "1", "--gen-length", "10",
                     "--block-length", "4"]) == 2
    assert "block_length=4 must divide gen_length=10" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="tokenizer.json"):
        cli.main(["generate", "--model", str(tmp_path), "--prompt", "hello"])


@pytest.mark.skipif(not (cli.default_model_path() / "config.json").exists(), reason="no bundled model in this tree")
def test_bad_options_are_messages_naming_them(tmp_path, capsys):
    # text the bundled character tokenizer does not know (a space) used to become <pad> ids
    assert cli.main(["generate", "--prompt", "123 + 456 =", "--quiet"]) == 2
    assert "--prompt holds text the model's tokenizer does not know: [' ']" in capsys.readouterr().err
    # 0 used to be replaced by the default
    assert cli.main(["generate", "--prompt", "1+2=", "--gen-length", "0", "--quiet"]) == 2
    assert "gen_length must be a positive int, got 0" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "1+2=", "--block-length", "0", "--quiet"]) == 2
    assert "block_length" in capsys.readouterr().err
    # torch's RuntimeError used to come out as a traceback
    assert cli.main(["generate", "--prompt", "1+2=", "--device", "foo", "--quiet"]) == 2
    assert "--device 'foo'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["generate", "--prompt", "1+2=", "--device", "cuda", "--quiet"]) == 2
        assert "--device 'cuda': this machine has no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--n", "0"])
    assert "argument --n: must be a positive int, got 0" in capsys.readouterr().err
    for seconds in ("0", "-1", "inf", "soon"):
        with pytest.raises(SystemExit):
            cli.main(["serve", "--request-timeout", seconds])
        assert "argument --request-timeout: " in capsys.readouterr().err
    # the server's defaults are checked before it starts (the bundled model has no blocks; 1 is its mask id)
    assert cli.main(["serve", "--block-grid", "model"]) == 2
    assert "--block-grid model) needs a block-causal model" in capsys.readouterr().err
    assert cli.main(["serve", "--eos-id", "2", "1"]) == 2
    assert "eos_id and mask_id must differ" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--batch-size", "0"]) == 2
    assert "batch_size must be >= 1, got 0" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert cli.main(["distill", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "student")]) == 2
    assert not (tmp_path / "student").exists(), "a teacher that is not there writes nothing"


def test_eval_tells_models_with_one_directory_name_apart(tmp_path, monkeypatch):
    from unmask import evaluate

    for run in ("a", "b"):
        unmask.save_pretrained(tiny_model(seed=1), tmp_path / run / "model")
    labels = []
    monkeypatch.setattr(evaluate, "evaluate", lambda model, **kwargs: labels.append(kwargs["model_name"]) or [])
    monkeypatch.setattr(evaluate, "format_table", lambda results: "")
    paths = [str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model")]
    assert cli.main(["eval", "--model", paths[0], "--model", paths[1]]) == 0
    assert labels == paths
    assert cli.main(["eval", "--model", paths[0], "--model", paths[0]]) == 2


@pytest.mark.slow
def test_bench_quick_writes_json_lines(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert cli.main(["bench", "--quick", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["bench"] for row in rows} == {"sample", "commit", "attention"}
    for row in rows:
        assert row["median_ms"] > 0 and row["device"] and row["commit"]
    only = tmp_path / "commit.jsonl"
    assert cli.main(["bench", "--quick", "--only", "commit", "--out", str(only)]) == 0
    assert {json.loads(line)["bench"] for line in only.read_text().splitlines()} == {"commit"}


def test_generate_with_cache(tmp_path, capsys):
    unmask.save_pretrained(tiny_model(seed=2), tmp_path)
    assert cli.main(["generate", "--model", str(tmp_path), "--ids", "1,2,3", "--gen-length", "8",
                     "--block-length", "4", "--steps", "8", "--cache", "dual", "--quiet"]) == 0
    assert "NFE 8" in capsys.readouterr().err


def test_chat_template_through_transformers(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra")
    vocab = {"<s>": 0, "user": 1, "assistant": 2, "hello": 3, "[UNK]": 4, ":": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "unk_token": "[UNK]"}))
    assert cli.chat_prompt(str(tmp_path), "hello") == [1, 5, 3, 2, 5]  # "user: hello assistant:"


def test_a_tokenizer_shipped_as_code_runs_only_when_trusted(tmp_path):
    # Dream's tokenizer is code in the checkpoint (tokenizer_config.json's auto_map): --chat
    # and unmask serve stop with a message naming --trust-remote-code, and run none of it
    # (this one raises if it runs); before, --chat asked on the terminal and serve went on
    # without the chat template.
    pytest.importorskip("transformers", reason="the hf extra")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}, "tokenizer_class": "XTokenizer",
        "chat_template": "{{ messages[0]['content'] }}"}))
    (tmp_path / "tokenization_x.py").write_text("raise RuntimeError('the checkpoint code ran')\n")
    with pytest.raises(SystemExit, match="--trust-remote-code"):
        cli.chat_prompt(str(tmp_path), "hello")
    pytest.importorskip("starlette", reason="the serve extra")
    from unmask.serving.app import Server

    model = unmask.from_pretrained(cli.default_model_path())
    with pytest.raises(SystemExit, match="--trust-remote-code"):
        Server(model, model.tokenizer, model_name="m", model_dir=str(tmp_path))


def test_gpucheck_plan_and_arguments(capsys, tmp_path, monkeypatch):
    from unmask import gpucheck

    monkeypatch.chdir(ROOT)
    assert gpucheck.main(["--out", str(tmp_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    named = [line.split()[0] for line in printed.splitlines() if not line.startswith(" ")]
    assert named == list(gpucheck.STAGES)
    assert "-m gpu" in printed and "--stage generate" in printed
    assert sum(gpucheck.STAGE_LIMITS.values()) <= 560, "the stages fit one 10-minute command with room to start"
    assert f"total limit {sum(gpucheck.STAGE_LIMITS.values())} s" in printed
    with pytest.raises(SystemExit):
        gpucheck.main(["--out", str(tmp_path), "--only", "tests,warp_speed"])
    assert "unknown stages ['warp_speed']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpucheck.main(["--out", str(tmp_path / "run")]) == 2
        assert "no CUDA device visible" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_gpucheck_runs_the_gpu_cases_and_reads_a_steps_weights():
    """The tests stage runs the cases marked gpu (every case skipped without a device, and
    only those); the generate floor counts the weights a step reads, not the embedding."""
    import subprocess
    import sys

    from unmask import gpucheck

    command = gpucheck.test_command(ROOT / "tests")
    listed = subprocess.run([*command, "--collect-only"], capture_output=True, text=True, cwd=ROOT).stdout
    cases = [line for line in listed.splitlines() if "::" in line]
    assert cases and any("test_cuda_attention.py" in case for case in cases)
    assert not any("interpreter" in case.split("[")[-1] for case in cases), "no interpreter case under -m gpu"
    assert sys.executable == command[0]
    model = tiny_model()
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    assert gpucheck.step_weight_bytes(model) == every - model.embed.weight.numel() * 4
    tied = unmask.DiffusionTransformer.random(tiny_config(weight_tying=True))
    assert gpucheck.step_weight_bytes(tied) == sum(p.numel() * p.element_size() for p in tied.parameters())


def test_bench_rows_name_the_commit_a_copied_tree_gives(monkeypatch):
    from unmask.benchmarks import harness

    monkeypatch.setenv("UNMASK_COMMIT", "abc1234")
    assert harness.git_commit() == "abc1234"


def test_bench_rows_say_dirty_for_changed_code_not_for_appended_results(tmp_path, monkeypatch):
    import subprocess

    from unmask.benchmarks import harness

    monkeypatch.delenv("UNMASK_COMMIT", raising=False)

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "cpu.jsonl").write_text("{}\n")
    (tmp_path / "kernel.cpp").write_text("int x;\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "one")
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=tmp_path, capture_output=True,
                            text=True).stdout.strip()
    assert harness.git_commit(tmp_path / "bench") == commit
    (tmp_path / "bench" / "results" / "cpu.jsonl").write_text("{}\n{}\n")  # a second run's rows
    assert harness.git_commit(tmp_path / "bench") == commit
    (tmp_path / "kernel.cpp").write_text("int y;\n")
    assert harness.git_commit(tmp_path / "bench") == commit + "-dirty"


def test_gpucheck_stages_are_isolated_and_time_limited(tmp_path, monkeypatch):
    """A bench stage runs in its own process: one that hangs is stopped at its limit, one
    that fails (a GPU fault kills its process) is reported, and the next one runs."""
    import sys

    from unmask import gpucheck

    scripts = {"sample": "import time; time.sleep(30)", "commit": "raise SystemExit(3)",
               "attention": f"open({str(tmp_path / '.attention.md')!r}, 'w').write('a table')"}
    monkeypatch.setattr(gpucheck, "stage_command", lambda stage, out: [sys.executable, "-c", scripts[stage]])
    assert gpucheck.run_stage("sample", tmp_path, limit=1) == {
        "failed": "ran past its 1 s limit (stages.log holds what it printed)"}
    assert gpucheck.run_stage("commit", tmp_path, limit=30) == {"failed": "exit status 3 (see stages.log)"}
    assert gpucheck.run_stage("attention", tmp_path, limit=30) == {"exit_code": 0, "table": "a table"}
    assert "===== sample" in (tmp_path / "stages.log").read_text()
