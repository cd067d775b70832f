"""The data that ships inside solverx (``solverx.data``): the sample corpus, general replay, replay questions and
probes. :data:`DATA_DIR` finds it the same way in an editable checkout and in an installed wheel."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
