"""nettailor: tailor pretrained CNNs to new tasks by changing the architecture (NetTailor, CVPR 2019)."""

__version__ = "0.1.0"
