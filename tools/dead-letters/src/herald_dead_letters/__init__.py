"""`herald-dead-letters` (`cli`), the operator's tool for Herald's dead-letter queues. It applies
the contracts of `herald_shared` (topology, retry headers, broker settings) and lives apart from
them: the services need the contracts, not the tool."""
