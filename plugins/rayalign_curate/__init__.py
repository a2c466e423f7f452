"""Data curation: normalise, filter, deduplicate and mix datasets before training.

    curate   several chat (or preference) sources in any registered format -> quality filters ->
             exact and MinHash near-duplicate removal, also across train/validation/test ->
             weighted mixture (replay of general data) -> `curated` dataset + report.json

Also registers the Alpaca (``instruction``/``input``/``output``) and ShareGPT
(``conversations`` of ``from``/``value``) formats, and the built-in filters ``length``,
``refusal`` and ``char_ratio`` (hook ``register_filters``).
"""

from rayalign.hookspecs import hookimpl

from rayalign_curate.filters import FILTERS
from rayalign_curate.formats import FORMATS
from rayalign_curate.stage import CurateStage

RAYALIGN_HOOKSPEC = ">=1.2,<2"


@hookimpl
def register_stages(register):
    register(CurateStage)


@hookimpl
def register_data_formats(register):
    for fmt in FORMATS:
        register(fmt)


@hookimpl
def register_filters(register):
    for cls in FILTERS:
        register(cls)
