"""FID and CLIP-score evaluation, backend-neutral: image discovery and preprocessing, statistics, the Fréchet
distance, CLIP-score arithmetic and prompt grouping in numpy/scipy/PIL; the feature networks themselves live in
msd_lora.backends.{torch,mindspore} and are reached through `msd_lora.eval.networks`."""
