"""The studies of the paper, one module each, over the engine: cloze and the census, localize,
KN consistency, KN sets and CAS, editing, query-KN mapping, knowledge synapses."""
