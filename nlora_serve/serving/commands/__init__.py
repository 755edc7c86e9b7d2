"""The server's commands, as ``nlora_serve/cli.py`` dispatches them::

    serve.py            ``nlora-serve serve``: runs the server (signals, the drain, a dead engine's exit)
                        that serve_build.py builds from serve_flags.py's flags, with backend.py
                        (--backend), engine_flags.py (device and size flags) and example_tenants.py
                        (--example-tenants); serve_checks.py checks the flags that need neither torch
                        nor the model before serve.py's imports (a refused start answers in a
                        fraction of a second)
    generate.py         ``nlora-serve generate``: one prompt through the engine, no server, from
                        generate_flags.py's flags (serve_flags.py, engine_flags.py and generate_flags.py
                        import no torch: ``--help`` and a mistyped flag answer at once)
    keys.py             ``nlora-serve keys {new,hash,list}``
    exit_now.py         a dead engine's exit past its stuck step thread (``os._exit``, stdio flushed)
"""
