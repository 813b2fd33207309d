"""ACA-Py agent simulators: real mediator and multitenant agents, and an asyncio client of their admin API."""
