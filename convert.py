"""The authors' released weights (and SD3-Medium's) in this repository's checkpoints, and the parity check.

Reads the release folders of pyramid-flow-sd3 as they are downloaded (diffusion_transformer_384p/ or
_768p/, causal_video_vae/) and writes the checkpoints sample.py and train.py load; --check runs the
release's tiny fixtures through dit.py and vae.py and prints the largest difference from the
release's own outputs. App. B: the MM-DiT of SD3 Medium, the causal VAE.
"""
import sys

from common import fail


# ---- the MM-DiT (release-mmdit)


# ---- the causal VAE (release-vae)
def convert_vae_folder(folder):
    """(vae_config_dict, state_dict) of this repo's vae.CausalVAE from a release causal_video_vae/ folder."""
    raise NotImplementedError("release-vae: the causal VAE's conversion")


def vae_parity(fixture: dict) -> float:
    """Largest absolute difference between vae.py and the release's outputs stored in `fixture`."""
    raise NotImplementedError("release-vae: the causal VAE's parity")


# ---- command line (release-mmdit)
def main(argv):
    fail("convert.py: not written yet")


if __name__ == "__main__":
    main(sys.argv[1:])
