<?php
// A fatal error (undefined function): Status 500 with display_errors Off, a 200 with the text
// in the body when display_errors is On.
echo "before\n";
fw_this_function_does_not_exist();
echo "after\n";
