"""Bad input is a clear error naming the problem, raised before any weights are loaded."""

from __future__ import annotations

import pytest

from dsi_mpi.config import ConfigError, RunConfig
from dsi_mpi.preflight import preflight

T = "emulated:tpot_ms=1"
D = "emulated:tpot_ms=1,acceptance=0.5"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lookahead": 0}, "--lookahead must be >= 1"),
        ({"min_drafts": 0}, r"--min-drafts must be from 1 to --lookahead \(5\), got 0"),
        ({"lookahead": 2, "min_drafts": 3}, r"--min-drafts must be from 1 to --lookahead \(2\)"),
        ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"),
        ({"mode": "turbo"}, "--mode must be one of"),
        ({"drafter": None}, "needs --drafter"),
        ({"drafter": "emulated:tpot_ms=1"}, "needs acceptance"),
        ({"target": "emulated:tpot_ms=1,acceptance=0.3"}, "belongs in the drafter"),
        ({"drafter": "emulated:tpot_ms=1,acceptance=0.5,vocab=10"}, "share vocab and seed"),
        ({"drafter": "emulated:tpot_ms=x,acceptance=0.5"}, "--drafter: malformed emulated spec"),
        ({"verify": "rejection"}, "emulated backends support --verify exact only"),
        ({"mode": "si", "sp": 3}, "uses one target server"),
        ({"sp": 0}, "--sp must be >= 1"),
        ({"drafter": "/some/model"}, "both be emulated"),
        ({"poll": "busy"}, "--poll must be one of auto, spin, backoff"),
        ({"engine": "turbo"}, "--engine must be one of auto, eager, static, cudagraph"),
        ({"engine": "cudagraph"}, "--engine cudagraph needs --device cuda"),
        ({"graph_segments": 0}, "--graph-segments must be >= 1"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    args = {"target": T, "drafter": D} | kwargs
    with pytest.raises(ConfigError, match=message):
        RunConfig(**args)


def test_nonsi_needs_no_drafter_and_ignores_lookahead() -> None:
    config = RunConfig(target=T, mode="nonsi", lookahead=0)
    assert not config.uses_drafter


def test_temperature_and_top_p_errors_name_the_fix() -> None:
    from dsi_mpi.verify import SamplingParams

    with pytest.raises(ValueError, match="use 0 for greedy"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="use 1.0 to disable"):
        SamplingParams(top_p=1.01)


def test_missing_model_path(tmp_path) -> None:
    config = RunConfig(target=str(tmp_path / "missing"), drafter=str(tmp_path / "missing2"))
    with pytest.raises(ConfigError, match="--target: model path .* does not exist"):
        preflight(config, prompt="hello")


def test_mismatched_vocabularies_are_translated_or_refused(tiny_suite: dict[str, str], tmp_path,
                                                           capsys) -> None:
    """A drafter with another tokenizer is translated (preflight says how); under rejection
    sampling one that shares too few tokens with the target is refused before any compute."""
    from dsi_mpi.tiny import build_tiny_model, build_tokenizer, unrelated_lines

    other = build_tiny_model(tmp_path / "other", tokenizer=build_tokenizer(
        tmp_path / "tok", vocab_size=300))
    llama = tiny_suite["llama"]
    preflight(RunConfig(target=llama, drafter=other), prompt="hello")
    assert "translated (string-level exact matching, SLEM" in capsys.readouterr().out
    preflight(RunConfig(target=llama, drafter=other, verify="rejection"), prompt="hello")
    assert "translated (token-level intersection, TLI" in capsys.readouterr().out
    unrelated = build_tiny_model(tmp_path / "unrelated", tokenizer=build_tokenizer(
        tmp_path / "tok2", vocab_size=1500, lines=unrelated_lines()))
    refused = r"share \d+ of the drafter's \d+ tokens .* --verify exact"
    with pytest.raises(ConfigError, match=refused):
        preflight(RunConfig(target=llama, drafter=unrelated, verify="rejection"), prompt="hello")
    preflight(RunConfig(target=llama, drafter=unrelated), prompt="hello")  # exact: any pair


def test_prompt_longer_than_context(tiny_suite: dict[str, str]) -> None:
    config = RunConfig(target=tiny_suite["llama"], drafter=tiny_suite["llama/perturbed"],
                       max_new_tokens=10)
    with pytest.raises(ConfigError, match="the model's context is 256"):
        preflight(config, prompt_ids=",".join(["5"] * 250))
    prompts, tokenizer = preflight(config, prompt_ids="5,6,7")
    assert [p.ids for p in prompts] == [[5, 6, 7]] and tokenizer is not None


def test_prompt_sources(tiny_suite: dict[str, str], tmp_path) -> None:
    config = RunConfig(target=tiny_suite["gpt2"], drafter=tiny_suite["gpt2/identical"])
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Once upon a time"}\n\n{"prompt_ids": [3, 4, 5], "seed": 9}\n'
                    'plain text line\n')
    prompts, tokenizer = preflight(config, prompt_file=str(path))
    assert (prompts[1].ids, prompts[1].seed, prompts[0].seed) == ([3, 4, 5], 9, None)
    assert len(prompts) == 3
    assert tokenizer.decode(prompts[0].ids) == "Once upon a time"
    with pytest.raises(ConfigError, match="exactly one of"):
        preflight(config, prompt="a", prompt_ids="1")
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        preflight(config, prompt_ids="1,99999")
    with pytest.raises(ConfigError, match="does not exist"):
        preflight(config, prompt_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="need a tokenizer"):
        preflight(RunConfig(target=T, drafter=D), prompt="hello")


def test_poll_flag_reaches_every_config() -> None:
    from dsi_mpi.cli import build_configs, make_parser

    argv = ["run", "--target", T, "--drafter", D, "--mode", "dsi,nonsi", "--prompt-ids", "1",
            "--output", "o.jsonl"]
    assert [c.poll for c in build_configs(make_parser().parse_args(argv))] == ["auto", "auto"]
    configs = build_configs(make_parser().parse_args([*argv, "--poll", "backoff"]))
    assert [c.poll for c in configs] == ["backoff", "backoff"]
    with pytest.raises(ConfigError, match="invalid choice: 'busy'"):
        make_parser().parse_args([*argv, "--poll", "busy"])


@pytest.mark.parametrize(("argv", "code"), [(["--help"], 0), (["run", "--help"], 0),
                                            (["run", "--no-such-flag"], 2), ([], 2)])
def test_help_and_usage_errors_exit_as_argparse_says(argv: list[str], code: int,
                                                     capsys: pytest.CaptureFixture) -> None:
    """--help exits 0 with its text; a usage error exits 2 with one line saying why; neither
    prints a traceback."""
    from dsi_mpi.cli import main

    assert main(argv) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "SystemExit" not in err
    if code == 0:
        assert "usage: dsi-mpi" in out and not err
    else:
        assert len(err.strip().splitlines()) == 1 and "error:" in err
