"""Serve deployment ``clara/full-pipeline``: this process registers it and runs the flow runs it picks up.

Started in the background by ``python -m clara_infra.services up``; run it in a terminal to watch runs' logs.
"""

from __future__ import annotations


def main() -> None:
    from prefect.types.entrypoint import EntrypointType

    from clara_flows.pipeline import full_pipeline

    # The deployment names its flow by module (clara_flows.pipeline.full_pipeline), not by a file path relative to the
    # folder this process started in: flow runs import the installed package, wherever the server runs.
    full_pipeline.serve(name="full-pipeline", tags=["clara"], entrypoint_type=EntrypointType.MODULE_PATH,
                        description="CLaRa end to end: synthesis -> SCP -> E2E -> pgvector -> evaluation -> promotion. "
                                    "Parameters default to a CPU-laptop run on the bundled corpus.")


if __name__ == "__main__":
    main()
