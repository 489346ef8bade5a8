// Colorun: placeholder until its issue lands.
