<?php
// exit(3): PHP-FPM still answers with appStatus 0 and no Status header.
echo "exiting\n";
exit(3);
