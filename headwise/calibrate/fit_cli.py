"""``headwise fit <kind>``: fit one head kind's parameters to a model and write a plan.

``headwise calibrate`` chooses each head's kind and span under a KV budget; ``headwise fit`` fits
what a kind needs besides its span (feature maps, routers, powers) and chooses its heads under
its own budget. Each kind's fitting is ``headwise/kinds/<kind>/fit.py`` (``HELP``,
``add_arguments(parser)``, ``run(args)``); the kinds come from ``calibrate.kinds.FIT``.

Examples::

    headwise fit lightning --plan dense --heads auto --fraction 0.25 --out lin25.json
    headwise fit hybrid --plan dense --heads auto --fraction 0.25 --window 64 --sink 64 --out hyb25.json
    headwise fit moh --active 0.9,0.75,0.5 --out 'moh{active}.json'
    headwise fit softplus --out softplus.json
"""

from __future__ import annotations


def register(subparsers) -> None:
    from ..cli import add_threads
    from .kinds import fit_kinds, fit_module

    p = subparsers.add_parser("fit", help="fit a head kind's parameters to a model and write a plan",
                              description=__doc__.split("\n")[0])
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in fit_kinds():
        module = fit_module(kind)
        sub = kinds.add_parser(kind, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        add_threads(sub)
        sub.set_defaults(func=module.run)
