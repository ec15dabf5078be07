"""Jobs: their states and transitions (as data), the queue with leases, the worker."""
