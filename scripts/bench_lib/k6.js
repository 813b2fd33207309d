// k6 script for scripts/bench: one GET / per iteration against BENCH_URL.
// BENCH_SLEEP (seconds, default 0) is a pause after each request: 3600 for the idle-VU memory test.
import http from 'k6/http';
import { sleep } from 'k6';

export const options = { discardResponseBodies: true };
const url = __ENV.BENCH_URL;
const pause = Number(__ENV.BENCH_SLEEP || 0);

export default function () {
  http.get(url);
  if (pause > 0) sleep(pause);
}
