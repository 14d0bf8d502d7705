"""Backend-neutral diffusion maths: the noise schedule, forward process and samplers (numpy only)."""
from msd_lora.diffusion.samplers import SAMPLERS, init_noise_sigma, sample, sampler_timesteps, timesteps
from msd_lora.diffusion.schedule import NoiseSchedule, add_noise, training_target

__all__ = [
    "SAMPLERS",
    "NoiseSchedule",
    "add_noise",
    "init_noise_sigma",
    "sample",
    "sampler_timesteps",
    "timesteps",
    "training_target",
]
