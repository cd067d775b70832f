"""The daemon's wiring: ``serve`` builds engines, catalog, registry and the training manager and hands them to the
HTTP app; ``exclusive`` pauses a base while a training run too big to share memory with it runs. The only place
where the server and the trainer meet. See docs/architecture.md.
"""
