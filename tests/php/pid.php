<?php
// Prints the FPM child's pid: N jobs over few connections show few distinct pids.
echo getmypid();
