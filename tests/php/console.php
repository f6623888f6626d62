<?php
// A stand-in for a Symfony app's console running the deferred-event bundle's command, for
// --executor cli: `php console.php fervo:deferred-event:dispatch DATA`. It insists on exactly
// that argv, then acts on DATA, "VERB" or "VERB:ARG":
//   ok:X           records the run like record.php (sha1 and length of the whole DATA)
//   throw:TEXT     records a failed run (_attempts.php), then an uncaught RuntimeException
//   exit:N         writes "console exiting with N" to stderr and exits with status N
//   sleep:S[:X]    sleeps S seconds (a float), then records the run (X tells runs apart)
//   group:S[:X]    starts `sleep S` as its own child, writes "<own pid> <child pid>" to
//                  FW_RECORD_FILE.pids, then sleeps S seconds itself: a timeout must kill both
//   print:N:CODE   writes N MiB to stdout and N MiB to stderr, 1 MiB at a time, then exits CODE
//   env:NAME       records "NAME=<value of the environment variable NAME>" as the run's data
//   kill:N         sends itself signal N (posix_kill), as a crash or an OOM kill would
// Records go to FW_RECORD_FILE, from the environment the worker passes on.
require __DIR__ . '/_common.php';
require __DIR__ . '/_attempts.php';

if (($argv[1] ?? null) !== 'fervo:deferred-event:dispatch' || count($argv) !== 3) {
    fwrite(STDERR, 'usage: console.php fervo:deferred-event:dispatch DATA; got ' . json_encode(array_slice($argv, 1)) . "\n");
    exit(64);
}
$data = $argv[2];
[$verb, $arg] = array_pad(explode(':', $data, 2), 2, '');

switch ($verb) {
    case 'throw':
        fw_record_failure($data);
        throw new RuntimeException('listener failed: ' . $arg);
    case 'exit':
        fwrite(STDERR, "console exiting with $arg\n");
        exit((int) $arg);
    case 'sleep':
        usleep((int) round((float) $arg * 1e6));
        fw_record($data);
        break;
    case 'group':
        $seconds = (float) $arg;
        $child = proc_open(['sleep', (string) $seconds], [], $pipes);
        $status = proc_get_status($child);
        file_put_contents(fw_record_file() . '.pids', getmypid() . ' ' . $status['pid'] . "\n", FILE_APPEND | LOCK_EX);
        usleep((int) round($seconds * 1e6));
        fw_record($data);
        break;
    case 'print':
        [$mib, $code] = array_pad(explode(':', $arg, 2), 2, '0');
        $chunk = str_repeat('x', 1 << 20);
        for ($i = (int) $mib; $i > 0; $i--) {
            fwrite(STDOUT, $chunk);
            fwrite(STDERR, $chunk);
        }
        exit((int) $code);
    case 'kill':
        posix_kill(getmypid(), (int) $arg);
        sleep(5);
        exit(0);
    case 'env':
        $value = getenv($arg);
        fw_record($arg . '=' . ($value === false ? '' : $value));
        break;
    default:
        fw_record($data);
}
echo "ok\n";
