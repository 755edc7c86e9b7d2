"""``nlora-serve adapters compress``: many LoRAs into one family that serves as NLoRA tenants.

A family shares A_f [R, in] and B_f [out, R] per site; each member keeps only its R×R N (DESIGN §1),
so the engine serves it as a tied-like tenant (the layout on disk is ``adapters/family.py``'s).

Modules::

    basis.py    the maths: a joint low-rank basis of many LoRAs' deltas and each member's N
    build.py    a collection of adapter folders -> one family on disk (reads them as the server would)
    report.py   the quality report: weight error per site and output drift against each LoRA
    cli.py      the ``adapters compress`` command (``--add`` projects new members onto a family)
"""
