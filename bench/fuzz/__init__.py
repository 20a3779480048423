"""Network fuzzing of the engine's DICOM port: ``python -m bench fuzz`` (see bench/README.md).

- ``messages``: valid messages built byte by byte (the seeds the inputs mutate);
- ``cases``: the fuzz inputs, one pure function of (seed, input number);
- ``peer``: sends one input on its own connection and names the engine's reaction;
- ``sender``: the well-behaved sender, run in its own process, that must lose nothing;
- ``watch``: what is judged on the engine from outside (log, RSS, CPU, open connections);
- ``campaign``: starts everything, runs the inputs, checks, writes the reports.
"""
