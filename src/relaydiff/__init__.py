"""relaydiff: text-to-image diffusion served across edge servers and user devices."""

__version__ = "0.1.0"
