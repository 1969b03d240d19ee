"""The engine: what qloc does to one model. Architectures and their intervention sites, loading,
tokenization, cloze scoring, the path integrator and the attribution methods for neurons and
attention, value-vector edits. Nothing here knows of facts, runs or tables."""
