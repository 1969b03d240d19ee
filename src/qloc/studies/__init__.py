"""The studies of the paper, one module each over the engine, and their registry.

``STUDIES`` lists every study in the order ``qloc reproduce`` runs them; the command line, the
report's panels and the README's command list derive from it (:mod:`qloc.studies.registry` says
what an entry declares). Adding a study is one module with a ``STUDY`` entry, listed here.
"""

from . import agreement, census, cloze, consistency, editing, localize, mapping, synapses
from .registry import Study

STUDIES: tuple[Study, ...] = (
    cloze.STUDY,
    census.STUDY,
    localize.STUDY,
    consistency.STUDY,
    agreement.STUDY,
    editing.STUDY,
    mapping.STUDY,
    synapses.STUDY,
)
