// QEMUSimulator: placeholder until its issue lands.
