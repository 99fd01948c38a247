"""Serve deployment ``clara/full-pipeline``: this process registers it and runs the flow runs it picks up.

Started in the background by ``python -m infra.services up``; run it in a terminal to watch runs' logs.
"""

from __future__ import annotations


def main() -> None:
    from flows.pipeline import clara

    clara.serve(name="full-pipeline", tags=["clara"],
                description="CLaRa end to end: synthesis -> SCP -> E2E -> pgvector -> evaluation -> promotion. "
                            "Parameters default to a CPU-laptop run on the bundled corpus.")


if __name__ == "__main__":
    main()
