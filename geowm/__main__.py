"""``python -m geowm`` = the ``geowm`` command (used under ``torchrun -m geowm train ...``)."""

from geowm.cli import app

app()
