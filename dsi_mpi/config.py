"""The run's configuration: one frozen dataclass, validated when it is made.

Every rank builds the same config from the same command line, so a bad value is reported
identically everywhere before any model is loaded (only rank 0 prints it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsi_mpi.backends import ENGINES, EmulatedSpec, EngineOptions, is_emulated
from dsi_mpi.backends.choice import resolve_engine
from dsi_mpi.verify import SamplingParams

MODES = ("dsi", "si", "nonsi")
VERIFY_MODES = ("exact", "rejection")
DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")
POLL_CHOICES = ("auto", "spin", "backoff")  # see dsi_mpi/transport.py and docs/cluster.md


class ConfigError(ValueError):
    """Bad input: a message that names the problem and the fix; exit code 2, no traceback."""


@dataclass(frozen=True)
class RunConfig:
    target: str  # local path, hub id or emulated: spec of the target model
    drafter: str | None = None  # the same for the drafter; unused by nonsi
    mode: str = "dsi"  # dsi, si (classic speculative inference) or nonsi (target alone)
    lookahead: int = 5  # drafts per verification task (k)
    # dsi: a task carries no drafts or at least this many (a forward of 2+ tokens that costs
    # much more than one, as on a CPU, is not worth a draft or two; `plan` picks it)
    min_drafts: int = 1
    sp: int | None = None  # target servers to use; None: every target rank (dsi), 1 otherwise
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    verify: str = "exact"  # exact (shared noise, token-identical) or rejection (Leviathan et al.)
    dtype: str = "auto"  # model dtype for HF backends
    device: str = "cpu"  # cpu, cuda, or cuda:N for model ranks
    engine: str = "auto"  # how model forwards run: eager, static, cudagraph; auto by device
    graph_segments: int = 1  # cudagraph: graphs per forward, CANCEL probed between them
    num_drafters: int = 1  # drafter ranks; ranks 1..num_drafters
    target_ranks: int = 1  # ranks per target server (tensor parallelism; servergroup.py)
    max_run_ahead: int | None = None  # drafts past the committed prefix; None: lookahead*(sp+1)
    reuse_cache: bool = False  # keep KV caches across prompts (off: every prompt pays its prefill)
    timeout_s: float = 600.0  # longest wait for any message before the job is aborted
    poll: str = "auto"  # how waiting ranks wait: spin, backoff, or auto (spin if each has a core)
    poll_max_s: float = 0.0005  # backoff: longest sleep between probes (added latency bound)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"--verify must be one of {', '.join(VERIFY_MODES)}, "
                              f"got {self.verify!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, "
                              f"got {self.engine!r}")
        if self.engine == "cudagraph" and not self.device.startswith("cuda"):
            raise ConfigError(f"--engine cudagraph needs --device cuda (CUDA graphs), got "
                              f"--device {self.device}: use --engine static or eager on a CPU")
        if self.graph_segments < 1:
            raise ConfigError(f"--graph-segments must be >= 1, got {self.graph_segments}")
        if self.mode != "nonsi" and not self.drafter:
            raise ConfigError(f"--mode {self.mode} needs --drafter SPEC "
                              "(a path, hub id or emulated: spec)")
        if self.mode != "nonsi" and self.lookahead < 1:
            raise ConfigError(f"--lookahead must be >= 1, got {self.lookahead}: "
                              "a task verifies at least one draft")
        if self.min_drafts < 1 or (self.mode == "dsi" and self.min_drafts > self.lookahead):
            raise ConfigError(f"--min-drafts must be from 1 to --lookahead ({self.lookahead}), "
                              f"got {self.min_drafts}")
        if self.sp is not None and self.sp < 1:
            raise ConfigError(f"--sp must be >= 1, got {self.sp}")
        if self.mode in ("si", "nonsi") and self.sp not in (None, 1):
            raise ConfigError(f"--mode {self.mode} uses one target server; "
                              f"drop --sp {self.sp} or use --mode dsi")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_drafters != 1:
            raise ConfigError("only one drafter rank is supported for now (--num-drafters 1)")
        if self.target_ranks < 1:
            raise ConfigError(f"--target-ranks must be >= 1, got {self.target_ranks}")
        if self.target_ranks > 1 and is_emulated(self.target):
            raise ConfigError(f"--target-ranks {self.target_ranks} shards a model over ranks: "
                              "it needs a model --target, not an emulated: one")
        if self.max_run_ahead is not None and self.max_run_ahead < self.lookahead:
            raise ConfigError(f"--max-run-ahead must be >= --lookahead ({self.lookahead}), "
                              f"got {self.max_run_ahead}")
        if self.poll not in POLL_CHOICES:
            raise ConfigError(f"--poll must be one of {', '.join(POLL_CHOICES)}, got {self.poll!r}")
        if self.poll_max_s <= 0:
            raise ConfigError(f"poll_max_s must be > 0 seconds, got {self.poll_max_s}")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout_s}")
        drafter = [("--drafter", self.drafter or "")] if self.uses_drafter else []
        specs = [("--target", self.target)] + drafter
        for flag, spec in specs:
            if is_emulated(spec):
                try:
                    parsed = EmulatedSpec.parse(spec)
                except ValueError as exc:
                    raise ConfigError(f"{flag}: {exc}") from None
                if flag == "--target" and parsed.acceptance is not None:
                    raise ConfigError(f"--target {spec!r}: "
                                      "acceptance= belongs in the drafter's spec")
                if flag == "--drafter" and parsed.acceptance is None:
                    raise ConfigError(f"--drafter {spec!r}: "
                                      "an emulated drafter needs acceptance=A (0..1)")
        if self.uses_drafter:
            if is_emulated(self.target) != is_emulated(self.drafter or ""):
                raise ConfigError("--target and --drafter must both be emulated: specs "
                                  "or both be models")
            if is_emulated(self.target):
                t, d = EmulatedSpec.parse(self.target), EmulatedSpec.parse(self.drafter or "")
                if (t.vocab, t.seed) != (d.vocab, d.seed):
                    raise ConfigError(
                        f"emulated target and drafter must share vocab and seed (the drafter "
                        f"imitates the target's language): target vocab={t.vocab},seed={t.seed}, "
                        f"drafter vocab={d.vocab},seed={d.seed}"
                    )
                if self.verify == "rejection":
                    raise ConfigError("--verify rejection needs model distributions; "
                                      "emulated backends support --verify exact only")

    @property
    def uses_drafter(self) -> bool:
        return self.mode != "nonsi"

    @property
    def emulated(self) -> bool:
        return is_emulated(self.target)

    def loads_as(self, other: RunConfig) -> bool:
        """Whether ``other`` needs the very models, engines, sampling and caches this config
        does: the configs of one run (its modes) may differ in mode, lookahead, min_drafts, SP
        and seed only."""
        def loaded(c: RunConfig) -> tuple[object, ...]:
            s = c.sampling
            return (c.target, c.drafter, c.dtype, c.device, c.engine, c.graph_segments,
                    c.target_ranks, c.reuse_cache, s.temperature, s.top_k, s.top_p)

        return loaded(self) == loaded(other)

    @property
    def engine_name(self) -> str | None:
        """The engine the model ranks run (eager, static or cudagraph; None: emulated)."""
        return None if self.emulated else resolve_engine(self.engine, self.device)

    def engine_options(self, longest_prompt: int, run_ahead: int) -> EngineOptions:
        """What the model ranks' engines are sized for: the longest sequence a rank's cache can
        hold (longest prompt + new tokens + drafts run ahead + a verification block), and
        blocks of up to lookahead + 1 tokens graphed."""
        capacity = longest_prompt + self.max_new_tokens + run_ahead + self.lookahead + 1
        return EngineOptions(kind=self.engine, capacity=capacity, max_block=self.lookahead + 1,
                             segments=self.graph_segments)

    def run_ahead(self, sp: int) -> int:
        """How far the drafter may run beyond the committed prefix."""
        from dsi_mpi.policy import default_run_ahead

        if self.mode == "si" or self.max_run_ahead is None:
            return default_run_ahead(self.mode, self.lookahead, sp)
        return self.max_run_ahead
