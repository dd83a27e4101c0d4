"""The sampler: ldm's DDPM noise schedule and the DDIM plan scoring runs (which timesteps, how
noisy the starting latent), validated against ldm's spacing rules; and the fast preset's plan."""
from __future__ import annotations

from dataclasses import dataclass

from diad_jax.configs.checks import require_choice, require_finite
from diad_jax.configs.serialization import Section
from diad_jax.errors import ConfigError

# DiffusionConfig.schedule: how noisy the starting latent is when start_t is None
SCHEDULES = ("official", "consistent")


def uniform_timesteps(num_train_timesteps: int, ddim_steps: int) -> range:
    """ldm's 'uniform' DDIM discretisation: range(0, T, T // S) + 1 -> 1, 101, ..., 901 (ascending)."""
    return range(1, num_train_timesteps + 1, num_train_timesteps // ddim_steps)


def spaced_timesteps(start_t: int, ddim_steps: int) -> list[int]:
    """`ddim_steps` timesteps from `start_t` down to 1, evenly spaced and rounded (descending);
    start_t=901 with 10 steps gives ldm's 901, 801, ..., 1. One step: [start_t]."""
    if ddim_steps == 1:
        return [start_t]
    step = (start_t - 1) / (ddim_steps - 1)
    return [start_t - int(round(i * step)) for i in range(ddim_steps)]


@dataclass(frozen=True)
class DiffusionConfig(Section):
    """ldm DDPM schedule and the DDIM sampler used at inference (spec section 6).

    The DDIM plan (which timesteps the sampler visits, and how noisy its starting latent is):
    - start_t=None (the reference): ldm's uniform spacing 1, 1 + T/S, ..., and the latent noised to
      t=999 ("official", the reference's quirk: the first step treats it as t=901) or to the first
      step's timestep ("consistent"). Only step counts that ldm's spacing honours are valid (10, 20, 25, ...).
    - start_t=t: the latent is noised to t and the S steps go from t down to 1, evenly spaced
      (`spaced_timesteps`); any S in 1..t. This is the consistent schedule started lower.
    - one_step=True (needs ddim_steps=1): the reconstruction is the DDIM pred_x0 of the single eps
      evaluation, (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), instead of ldm's last step to acp[0].
    """

    num_train_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    ddim_steps: int = 10
    ddim_eta: float = 0.0
    # "official": noise to t=999 then DDIM 901..1 (the reference's behaviour);
    # "consistent": noise to the first DDIM timestep. Only for start_t=None.
    schedule: str = "official"
    guidance_scale: float = 9.0
    start_t: int | None = None          # noise level of the input latent = the first step's timestep
    one_step: bool = False              # reconstruction = pred_x0 of one eps evaluation at the first timestep

    def __post_init__(self):
        require_choice(self, "schedule", SCHEDULES)
        if not 0.0 < self.linear_start < self.linear_end < 1.0:
            raise ConfigError(f"need 0 < {{0}} < {{1}} < 1, got {self.linear_start}, {self.linear_end}",
                              fields=["linear_start", "linear_end"])
        require_finite(self, "ddim_eta", "guidance_scale")
        if self.ddim_eta < 0:
            raise ConfigError(f"{{0}} must be >= 0, got {self.ddim_eta}", fields=["ddim_eta"])
        T, S = self.num_train_timesteps, self.ddim_steps
        if not isinstance(S, int) or not 1 <= S <= T:
            raise ConfigError(f"{{0}} must be in 1..{T}, got {S}", fields=["ddim_steps"])
        if not isinstance(self.one_step, bool):
            raise ConfigError(f"{{0}} must be True or False, got {self.one_step!r}", fields=["one_step"])
        if self.one_step and S != 1:
            raise ConfigError(f"{{0}} reconstructs from ONE eps evaluation: {{1}} must be 1, got {S}",
                              fields=["one_step", "ddim_steps"])
        if self.start_t is not None:
            if not isinstance(self.start_t, int) or not 1 <= self.start_t < T:
                raise ConfigError(f"{{0}} must be an integer timestep in 1..{T - 1}, got {self.start_t!r}",
                                  fields=["start_t"])
            if self.schedule != "consistent":
                raise ConfigError(f"{{0}}={self.start_t} noises the latent to the first step's timestep, which is "
                                  f"the 'consistent' schedule; set {{1}} ('official' noises to {T - 1} and starts at "
                                  f"ldm's first timestep, with no {{0}})", fields=["start_t", "schedule=consistent"])
            if S > self.start_t:
                raise ConfigError(f"{{0}}={S} is more than the {self.start_t} timesteps from {{1}}={self.start_t} "
                                  f"down to 1", fields=["ddim_steps", "start_t"])
            return
        spaced = uniform_timesteps(T, S)
        if len(spaced) != S or spaced[-1] >= T:  # ldm's spacing honours only some step counts
            good = [d for d in range(max(1, S - 5), S + 6)
                    if len(uniform_timesteps(T, d)) == d and uniform_timesteps(T, d)[-1] < T]
            raise ConfigError(f"{{0}}={S}: ldm's uniform spacing (every {T // S} of {T} timesteps, from 1) gives "
                              f"{len(spaced)} steps ending at timestep {spaced[-1]} (valid: 0..{T - 1}); nearby "
                              f"valid values: {good}; any step count works with {{1}} (and {{2}})",
                              fields=["ddim_steps", "start_t", "schedule=consistent"])

    def timesteps(self) -> list[int]:
        """The timesteps the sampler visits, in order (descending)."""
        if self.start_t is not None:
            return spaced_timesteps(self.start_t, self.ddim_steps)
        return list(uniform_timesteps(self.num_train_timesteps, self.ddim_steps))[::-1]

    @property
    def noise_t(self) -> int:
        """The q_sample level of the starting latent."""
        if self.start_t is None and self.schedule == "official":
            return self.num_train_timesteps - 1
        return self.timesteps()[0]


# The fast preset's sampler (EvalConfig.fast, --preset fast): the reconstruction is the pred_x0 of one
# eps evaluation at t=700, the cheapest setting of the measured grid that was at least as accurate as
# 10 DDIM steps on the demo models (benchmarks/RESULTS.md, "Scoring frontier").
FAST_SAMPLER = dict(schedule="consistent", ddim_steps=1, start_t=700, one_step=True)

