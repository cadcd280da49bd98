%%% dmuc_nif: the NIF half of mod_dmuc (the dmuc engine, in Rust). Kept in its own module so
%%% that mod_dmuc can be reloaded: a module that loads a NIF cannot be hot-reloaded.
-module(dmuc_nif).
-export([take_logs/0, refusal_log/2,
         master_quota/3, master_new/4, master_routes/2, master_presence/4, master_snapshot/7, master_iq/3,
         master_history/5, master_begin/2, master_end/2, master_outbound/3, master_left/3,
         master_link/4, master_groupchat/3, master_actions/1, master_config/4,
         mirror_new/13, mirror_handles/2, mirror_local/3, mirror_unavailable/3, mirror_remote/3, mirror_timeout/2,
         mirror_link/4, mirror_drain/1, mirror_s2s_closing/3, mirror_s2s_closed/3, mirror_s2s_in_closed/3, mirror_import/3, mirror_persist/1, mirror_flush_store/1, mirror_status/1,
         watch_new/2, watch_ping/3, watch_timeout/2, watch_status/1,
         watch_s2s_closed/4, watch_answer/3, watch_hear/3, watch_hear_from/3]).
-on_load(init/0).

init() ->
    Priv = case code:priv_dir(mod_dmuc) of
               {error, _} -> filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
               Dir -> Dir
           end,
    erlang:load_nif(filename:join(Priv, "dmuc_nif"), 0).

-define(NOT_LOADED, erlang:nif_error({not_loaded, ?MODULE})).

take_logs() -> ?NOT_LOADED.
refusal_log(_Peer, _Now) -> ?NOT_LOADED.
master_quota(_MaxRooms, _JoinRate, _JoinBurst) -> ?NOT_LOADED.
master_new(_Trusted, _MaxDepth, _MaxSize, _Quota) -> ?NOT_LOADED.
master_routes(_M, _To) -> ?NOT_LOADED.
master_presence(_M, _Now, _Xml, _Nick) -> ?NOT_LOADED.
master_snapshot(_M, _Now, _Room, _Mirror, _Nick, _Form, _Occupants) -> ?NOT_LOADED.
master_iq(_M, _Now, _Xml) -> ?NOT_LOADED.
master_history(_M, _Now, _Req, _Messages, _Subject) -> ?NOT_LOADED.
master_begin(_M, _Room) -> ?NOT_LOADED.
master_end(_M, _Room) -> ?NOT_LOADED.
master_outbound(_M, _Now, _Xml) -> ?NOT_LOADED.
master_left(_M, _Room, _Jid) -> ?NOT_LOADED.
master_link(_M, _Now, _Domain, _Up) -> ?NOT_LOADED.
master_groupchat(_M, _Now, _Xml) -> ?NOT_LOADED.
master_actions(_M) -> ?NOT_LOADED.
master_config(_M, _Now, _Room, _Form) -> ?NOT_LOADED.
mirror_new(_Service, _Masters, _QueueLimit, _JoinTimeout, _HistorySize, _PingInterval, _PingTimeout,
           _CatchUpMargin, _MaxDepth, _MaxSize, _MaxLocalOccupants, _MaxRooms, _StoreAfter) -> ?NOT_LOADED.
mirror_handles(_M, _Jid) -> ?NOT_LOADED.
mirror_local(_M, _Now, _Xml) -> ?NOT_LOADED.
mirror_unavailable(_M, _Now, _Xml) -> ?NOT_LOADED.
mirror_remote(_M, _Now, _Xml) -> ?NOT_LOADED.
mirror_timeout(_M, _Now) -> ?NOT_LOADED.
mirror_link(_M, _Now, _Master, _Up) -> ?NOT_LOADED.
mirror_drain(_M) -> ?NOT_LOADED.
mirror_s2s_closing(_M, _Now, _Domain) -> ?NOT_LOADED.
mirror_s2s_closed(_M, _Now, _Domain) -> ?NOT_LOADED.
mirror_s2s_in_closed(_M, _Now, _Domain) -> ?NOT_LOADED.
mirror_import(_M, _Now, _Items) -> ?NOT_LOADED.
mirror_persist(_M) -> ?NOT_LOADED.
mirror_flush_store(_M) -> ?NOT_LOADED.
mirror_status(_M) -> ?NOT_LOADED.
watch_new(_Trusted, _TimeoutSeconds) -> ?NOT_LOADED.
watch_ping(_W, _Now, _Xml) -> ?NOT_LOADED.
watch_timeout(_W, _Now) -> ?NOT_LOADED.
watch_status(_W) -> ?NOT_LOADED.
watch_s2s_closed(_W, _Now, _Service, _Domain) -> ?NOT_LOADED.
watch_answer(_W, _Now, _Xml) -> ?NOT_LOADED.
watch_hear(_W, _Now, _Mirror) -> ?NOT_LOADED.
watch_hear_from(_W, _Now, _Domain) -> ?NOT_LOADED.
