// QMPClient: placeholder until its issue lands.
