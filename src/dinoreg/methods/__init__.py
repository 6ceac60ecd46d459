"""Registration methods: each module registers one method (its settings and its chain of
stages) with :func:`dinoreg.methods.registry.method`."""
