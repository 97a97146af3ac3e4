/* A SIGSEGV/SIGBUS handler that prints the native stack (each frame as library+offset and its dynamic symbol) to
   stderr, then hands the signal to the handler it replaced (Python's faulthandler, if enabled: the Python frames
   follow) or the default action, so the process still dies of it. benchmarks/aoti_crash_trace.py builds it with cc
   and installs it (via ctypes) in a child process just before the call that crashes, where the machine has no gdb.
   Not async-signal-safe (dladdr, snprintf): a diagnostic for a process that is about to die anyway. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static struct sigaction previous[2];  /* SIGSEGV, SIGBUS */
static char alt_stack[1 << 16];       /* the handler still runs after a stack overflow */

void on_segv(int sig) {  /* exported: dladdr names it without addr2line */
  void *frames[64];
  int n = backtrace(frames, 64);
  char line[512];
  for (int i = 0; i < n; i++) {
    Dl_info info;
    int len;
    if (dladdr(frames[i], &info) && info.dli_fname) {
      len = snprintf(line, sizeof line, "#%d %s+0x%lx %s\n", i, info.dli_fname,
                     (unsigned long)((char *)frames[i] - (char *)info.dli_fbase), info.dli_sname ? info.dli_sname : "?");
    } else {
      len = snprintf(line, sizeof line, "#%d %p\n", i, frames[i]);
    }
    if (len > 0) write(2, line, len < (int)sizeof line ? len : (int)sizeof line - 1);
  }
  /* the replaced handler (or the default) takes the fault again when we return */
  sigaction(sig, &previous[sig == SIGBUS], NULL);
}

int install_segv_backtrace(void) {
  void *warm[2];
  backtrace(warm, 2);  /* the first call loads libgcc_s (dlopen, malloc): not inside the handler */
  stack_t ss;
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  ss.ss_flags = 0;
  if (sigaltstack(&ss, NULL) != 0) return -1;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_segv;
  sa.sa_flags = SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGSEGV, &sa, &previous[0]) != 0) return -1;
  return sigaction(SIGBUS, &sa, &previous[1]);
}
