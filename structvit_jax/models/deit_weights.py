"""DeiT's weight-adaptation rules (docs/official_weights.md, "DeiT on clips"): timm/DeiT's
`patch_embed.proj` is our `patch_embed`; an image DeiT into the video DeiT inflates the patch
kernel (UniFormer's rule for every `kernel`) and fills `time_embed` with its zero init
(TimeSformer's rule for a source without one)."""

from structvit_jax import weights

RULES = weights.Family(heads=("head",), torch_renames=(("patch_embed.proj.", "patch_embed."),))
