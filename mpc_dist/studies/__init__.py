"""Studies: many short training runs and what they show. ``horizon.py`` (`mpc-dist
horizon-study`, docs/horizon-study.md), ``rules.py`` (`mpc-dist rules-study`, docs/rules.md;
``paper_rules.py`` its ``--paper`` runs at the papers' recipes, resumable) and ``data.py``
(`mpc-dist data-study`, docs/data.md; ``torch_bp.py`` its torch-schedule baseline), with what
every study shares in ``common.py`` (a run's config, training it once and reading it back, a
pool of worker processes, a finished run's evaluations and weights); a new study is a module
beside them. Unlike the benchmarks (``bench/``) they call ``train()``."""
